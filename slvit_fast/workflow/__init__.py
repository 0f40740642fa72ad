"""Your model, your data: the train / calibrate / evaluate workflow and the demo experiment.

* :mod:`.data` - ImageFolder directories and ``.npz`` files, seeded splits, normalisation;
* :mod:`.finetune` - fine-tuning a whole backbone before its exits are trained;
* :mod:`.evaluation` - test-split report: per-exit accuracy/FLOPs, real early exit, wall-clock;
* :mod:`.experiment` - :func:`run_experiment` (``slvit-fast train --data``) and :func:`evaluate_run`
  (``slvit-fast evaluate``);
* :mod:`.rundir` - the files of a run directory; :mod:`.report` - the printed tables;
* :mod:`.digits` - the demo (``slvit-fast demo``): the paper's SL-ViT vs CNN comparison in miniature on
  scikit-learn's digits.
"""

from .errors import UsageError
from .experiment import RunSpec, evaluate_run, run_experiment

__all__ = ["UsageError", "RunSpec", "run_experiment", "evaluate_run"]
