"""slvit_fast: cheap single-layer vision transformer (SL-ViT) early exits for PyTorch.

Quick start::

    import torch, slvit_fast as sf
    exit = sf.SLViTExit.from_preset("resnet152-b1", num_outputs=10)
    logits = exit(torch.randn(8, 128, 28, 28))      # (8, 10)
"""

from __future__ import annotations

from .config import CNNExitConfig, SLViTConfig
from .cnn_exit import CNNExit
from .errors import (
    BackendNotImplementedError,
    BackendUnavailableError,
    CheckpointMismatchError,
    SLViTInputError,
)
from .exit_presets import list_presets
from .slvit_exit import SLViTExit
from .version import __version__
from .exit_result import EarlyExitResult
from .multi_exit import MultiExitNetwork
from .shape_probe import feature_shapes
from .attach import attach_exits
from .calibration import calibrate_fractions
from .inference_prep import FoldReport, fold_batchnorm, prepare_for_inference
from .huge_pages import HugePageReport, place_in_huge_pages
from . import accounting, analysis, calibration, export, policies, presets  # noqa: E402  (slvit_fast.policies, ...)

# Budget calibration moved from policies to calibration (which imports policies); its names stay
# reachable where they used to be, e.g. ``policies.calibrate_budget``.
for _name in ("calibrate_budget", "BudgetCandidate", "BudgetCalibration"):
    setattr(policies, _name, getattr(calibration, _name))
del _name

__all__ = [
    "SLViTConfig",
    "CNNExitConfig",
    "SLViTExit",
    "CNNExit",
    "list_presets",
    "SLViTInputError",
    "BackendUnavailableError",
    "BackendNotImplementedError",
    "CheckpointMismatchError",
    "__version__",
    "MultiExitNetwork",
    "EarlyExitResult",
    "feature_shapes",
    "attach_exits",
    "calibrate_fractions",
    "prepare_for_inference",
    "fold_batchnorm",
    "FoldReport",
    "place_in_huge_pages",
    "HugePageReport",
]
