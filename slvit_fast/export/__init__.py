"""Deploying exits and early-exit networks: ``torch.export`` / ONNX programs and a runner.

* :func:`export_early_exit` - a :class:`~slvit_fast.MultiExitNetwork` and its policy as one program per
  stage (backbone segment, exit, backbone tail) plus ``policy.json``, in ONNX or ``torch.export`` form.
* :class:`EarlyExitRunner` - runs such a folder with real batch compaction (ONNX Runtime or torch),
  equal to ``net.early_exit`` on the same inputs.
* :func:`policy_to_dict` / :func:`policy_from_dict` - exit policies as JSON data.

A single exit exports directly: ``torch.onnx.export(exit, (x,), dynamo=True)`` gives standard ONNX
operators on every backend, and ``torch.export`` programs of exits load in any process that has
imported ``slvit_fast``.
"""

from .early_exit import EarlyExitRunner, export_early_exit
from .policy_json import policy_from_dict, policy_to_dict
from .segments import SegmentationError

__all__ = ["export_early_exit", "EarlyExitRunner", "policy_to_dict", "policy_from_dict", "SegmentationError"]
