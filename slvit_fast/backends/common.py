"""What the fused backends share: one-time warnings and the reference fallback for dropout.

No fused kernel implements dropout. An exit in training mode with a non-zero dropout rate therefore
runs the reference (torch) math on every fused backend, with one warning per backend, so results are
never silently wrong - only the speed-up is lost.
"""

from __future__ import annotations

import threading
import warnings

from torch import Tensor

from .. import reference

_warned: set[str] = set()
_lock = threading.Lock()


def warn_once(message: str, stacklevel: int = 4) -> None:
    """``warnings.warn(message, RuntimeWarning)`` the first time this exact message comes up."""
    if message in _warned:  # lock-free fast path: torch.compile cannot trace through a lock
        return
    with _lock:
        if message in _warned:
            return
        _warned.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def forget_warnings() -> None:
    """Issue every warning again (tests that toggle the environment use this)."""
    with _lock:
        _warned.clear()


def dropout_active(module) -> bool:
    """True when ``module`` (an SLViTExit) would apply dropout: training mode and some rate > 0."""
    c = module.config
    return module.training and (c.dropout > 0 or c.attention_dropout > 0 or c.head_dropout > 0)


def reference_fallback(module, x: Tensor, extra: Tensor | None, backend: str) -> Tensor:
    """The exit on the reference ops in training mode (dropout on), after a one-time warning."""
    c = module.config
    warn_once(f"slvit_fast: backend {backend!r} does not fuse dropout; this exit is in training mode with "
              f"dropout={c.dropout}, attention_dropout={c.attention_dropout}, head_dropout={c.head_dropout}, "
              "so it runs on the torch reference (call .eval() or set the rates to 0 for the fused kernels)",
              stacklevel=5)
    return reference.slvit_exit(x, reference.module_params(module), c, extra, training=True)


__all__ = ["warn_once", "forget_warnings", "dropout_active", "reference_fallback"]
