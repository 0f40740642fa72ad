"""What the fused ops' autograd saves for backward.

A tensor made under ``torch.inference_mode()`` (e.g. the features of a frozen backbone run in
inference mode) may be *read* anywhere, but autograd refuses to *save* it ("Inference tensors cannot
be saved for backward"). The reference exit never saves its input as is (patch extraction copies it
first), so training an exit on such features works there; the fused ops save their inputs and must
make them saveable to behave the same. ``setup_context`` only runs when autograd records the op, so
the copy is paid only when training on inference tensors, never at inference.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def saveable(*tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """``tensors`` with every inference tensor replaced by a normal copy (None and others as they are)."""
    return [t.clone() if t is not None and t.is_inference() else t for t in tensors]


__all__ = ["saveable"]
