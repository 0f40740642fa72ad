"""Custom torch ops (``torch.library``) wrapping each backend's fused kernels.

One module per backend family registers its ops under the ``slvit_fast::`` namespace with a fake
(meta) implementation and autograd, so ``torch.compile(fullgraph=True)`` and ``opcheck`` work.
Backends (``slvit_fast.backends.*``) call these ops; modules never call kernels directly.

:func:`register_all` registers every op this installation has; ``import slvit_fast`` calls it, so a
saved ``torch.export`` program holding these ops loads in any process that imported slvit_fast.
"""

from __future__ import annotations

NATIVE_KINDS = ("cpu", "emu", "cuda")


def register_all() -> dict[str, str | None]:
    """Register the ops (with fake and autograd kernels) of every native extension and of the Triton
    kernels; ``{family: None if registered, else why not}`` (a missing build is a reason, not an error)."""
    from . import cpp_ops

    status: dict[str, str | None] = {kind: cpp_ops.ensure_registered(kind) for kind in NATIVE_KINDS}
    try:
        from . import triton_ops  # noqa: F401  (defines the slvit_fast::triton_* ops)
    except Exception as e:  # noqa: BLE001  (no or broken Triton: the triton backend reports it too)
        status["triton"] = f"{type(e).__name__}: {e}"
    else:
        status["triton"] = None
    return status


__all__ = ["register_all", "NATIVE_KINDS"]
