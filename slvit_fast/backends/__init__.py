"""Backend registry: which implementation of the fused exit ops runs for a given tensor.

Every backend implements the same exit forward (and, through autograd, backward) as
:mod:`slvit_fast.reference`. Selection, in order of precedence:

1. ``backend=`` of the module, when it is not ``"auto"``;
2. the environment variable ``SLVIT_FAST_BACKEND``, when set and not ``"auto"``;
3. automatic: the first available of ``AUTO_ORDER[device type]``.

While ``torch.onnx.export`` traces a model, every exit runs on ``"torch"`` whatever was requested, so
the ONNX graph holds standard operators only (ONNX Runtime cannot run our custom ops).

An explicitly requested backend that cannot run is an error naming the reason. The automatic choice
falls back to the next backend and says why once per reason (``warnings``), so a missing build never
silently changes results - every backend is tested against the reference.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Protocol

import torch

from ..errors import BackendNotImplementedError, BackendUnavailableError
from . import env
from .common import forget_warnings, warn_once

if TYPE_CHECKING:
    from torch import Tensor

ENV_VAR = env.BACKEND

# Every backend name the library knows, with the module that implements it.
KNOWN_BACKENDS: dict[str, str] = {
    "torch": "slvit_fast.backends.torch_backend",
    "triton": "slvit_fast.backends.triton_backend",
    "cuda": "slvit_fast.backends.cuda_backend",
    "cuda-emu": "slvit_fast.backends.cuda_emu_backend",
    "cpu": "slvit_fast.backends.cpu_backend",
}

# Preference for backend="auto", per device type. "cuda-emu" is a test backend, never automatic.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}


class Backend(Protocol):
    name: str

    def unavailable_reason(self, x: "Tensor") -> str | None:
        """None if this backend can run the exit on tensors like ``x``, else a short reason."""

    def slvit_exit(self, module: torch.nn.Module, x: "Tensor", extra: "Tensor | None") -> "Tensor":
        """The exit forward for ``module`` (an :class:`slvit_fast.SLViTExit`); differentiable."""


_loaded: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_lock = threading.Lock()


def _load(name: str) -> Backend | None:
    """Import the backend's module once; remember why it failed if it did."""
    backend = _loaded.get(name)
    if backend is not None:  # lock-free fast path: torch.compile cannot trace through a lock
        return backend
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in _load_errors:
            return None
        try:
            module = importlib.import_module(KNOWN_BACKENDS[name])
        except ModuleNotFoundError as e:
            if e.name == KNOWN_BACKENDS[name]:
                _load_errors[name] = "not implemented in this version of slvit_fast"
            else:
                _load_errors[name] = f"import failed: {e}"
            return None
        except Exception as e:  # a broken build must surface as a reason, not a crash at import time
            _load_errors[name] = f"import failed: {type(e).__name__}: {e}"
            return None
        _loaded[name] = module.BACKEND
        return module.BACKEND


def check_name(name: str) -> str:
    if name != "auto" and name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {['auto', *KNOWN_BACKENDS]}")
    return name


def get(name: str) -> Backend:
    """The backend object for ``name``; raises if it is not implemented or failed to load."""
    check_name(name)
    backend = _load(name)
    if backend is None:
        reason = _load_errors[name]
        if reason.startswith("not implemented"):
            raise BackendNotImplementedError(f"backend {name!r} is {reason}")
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return backend


def resolve(requested: str, x: "Tensor") -> Backend:
    """The backend that runs for a module with ``backend=requested`` on input ``x``."""
    check_name(requested)
    if torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export():
        # ONNX has no form for our custom ops: the reference ops (the same function, the specification
        # every backend is tested against) decompose into standard ONNX operators that any runtime runs.
        # (is_exporting first: it is a flag read, is_in_onnx_export costs microseconds.)
        return get("torch")
    if requested == "auto":
        requested = env.choice(ENV_VAR, ("auto", *KNOWN_BACKENDS), "auto")
    if requested != "auto":
        backend = get(requested)
        reason = backend.unavailable_reason(x)
        if reason is not None:
            raise BackendUnavailableError(f"backend {requested!r} cannot run here: {reason}")
        return backend
    order = AUTO_ORDER.get(x.device.type, ("torch",))
    skipped = []
    for name in order:
        backend = _load(name)
        reason = _load_errors.get(name) if backend is None else backend.unavailable_reason(x)
        if reason is None:
            if skipped:
                warn_once(
                    f"slvit_fast: backend 'auto' on {x.device.type} uses {name!r}; skipped "
                    + "; ".join(f"{n!r} ({r})" for n, r in skipped), stacklevel=5
                )
            return backend
        skipped.append((name, reason))
    raise BackendUnavailableError(f"no backend can run on {x.device}: {skipped}")


def status(x: "Tensor | None" = None) -> dict[str, str]:
    """Name -> 'available' or the reason it is not, for ``x`` (default: a CPU float32 tensor)."""
    probe = torch.empty(1, 1, 1, 1) if x is None else x
    out = {}
    for name in KNOWN_BACKENDS:
        backend = _load(name)
        if backend is None:
            out[name] = _load_errors[name]
        else:
            out[name] = backend.unavailable_reason(probe) or "available"
    return out


def _reset_for_tests() -> None:
    """Forget loaded backends and issued warnings (tests that toggle the environment use this)."""
    with _lock:
        _loaded.clear()
        _load_errors.clear()
    forget_warnings()


__all__: list[str] = ["Backend", "ENV_VAR", "KNOWN_BACKENDS", "AUTO_ORDER", "get", "resolve", "status"]


# Every custom op (and its fake/autograd kernels) exists from ``import slvit_fast`` on, not only after
# the first forward: a torch.export program saved elsewhere must load in a fresh process.
from ..ops import register_all as _register_all  # noqa: E402

OP_STATUS: dict[str, str | None] = _register_all()
