"""Torch ops of the compiled C++ / CUDA backends: fake (meta) implementations and autograd.

The ops themselves are defined in C++ (``TORCH_LIBRARY_FRAGMENT(slvit_fast, ...)`` in csrc/):

- ``slvit_fast::cpu_exit_forward(x, extra, params, cfg, eps, save) -> Tensor[]``: the whole exit on
  CPU; returns ``[logits]`` or, with ``save=True``, ``[logits, *saved activations]`` (float32).
- ``slvit_fast::cpu_exit_backward(grad_out, x, extra, params, saved, cfg, eps) -> Tensor[]``:
  ``[dx, dextra (empty if no extra), *dparams]``.
- ``slvit_fast::emu_exit_forward`` / ``slvit_fast::cuda_exit_forward(x, extra, params, cfg, eps)
  -> Tensor``: the CUDA kernels (two launches), under the SIMT emulator or on a GPU.
- ``slvit_fast::emu_exit_backward`` / ``slvit_fast::cuda_exit_backward(grad_out, x, extra, params, cfg,
  eps, need_dx) -> Tensor[]``: the backward kernels (two launches; num_layers 1..4), same outputs as
  ``cpu_exit_backward``.

This module registers the Python parts (``register_fake``, ``register_autograd``) once the extension
is loaded, and turns an :class:`~slvit_fast.SLViTConfig` into the ``cfg`` ints (the ``params`` list is
:func:`slvit_fast.reference.module_params`).
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch
from torch import Tensor

from .. import native, reference
from .saved import saveable

# The ``cfg`` ints of every C++ op, in the order csrc/ reads them (cfg[i]), each with how it is read
# from an SLViTConfig. The exit's tensors go in ``params`` in the layout of :mod:`slvit_fast.reference`.
_CFG_FROM_CONFIG = (
    ("ph", lambda c: c.patch_size[0]),
    ("pw", lambda c: c.patch_size[1]),
    ("d", lambda c: c.embed_dim),
    ("heads", lambda c: c.num_heads),
    ("key_dim", lambda c: c.key_dim),
    ("mlp_dim", lambda c: c.mlp_dim),
    ("head_hidden", lambda c: c.head_hidden),
    ("num_outputs", lambda c: c.num_outputs),
    ("extra_tokens", lambda c: c.extra_tokens),
    ("extra_dim", lambda c: c.extra_dim),
    ("mlp_residual", lambda c: int(c.mlp_residual)),
    ("activation", lambda c: 0 if c.activation == "gelu" else 1),
    ("num_layers", lambda c: c.num_layers),
)
CFG_FIELDS = tuple(name for name, _ in _CFG_FROM_CONFIG)
_CFG_INDEX = {name: i for i, name in enumerate(CFG_FIELDS)}

# Kept importable here for callers of the C++ ops (tests build op arguments with them).
param_names = reference.param_names
module_params = reference.module_params


def config_ints(config) -> list[int]:
    """The ``cfg`` argument of the C++ ops for an SLViTConfig (fields :data:`CFG_FIELDS`)."""
    return [get(config) for _, get in _CFG_FROM_CONFIG]


class _Sizes:
    def __init__(self, x: Tensor, cfg: Sequence[int]):
        f = dict(zip(CFG_FIELDS, (int(v) for v in cfg)))
        self.ph, self.pw, self.d, self.h, self.kd = f["ph"], f["pw"], f["d"], f["heads"], f["key_dim"]
        self.M, self.Hh, self.O, self.E, self.De = (f["mlp_dim"], f["head_hidden"], f["num_outputs"],
                                                    f["extra_tokens"], f["extra_dim"])
        self.L, self.residual, self.act = f["num_layers"], bool(f["mlp_residual"]), f["activation"]
        self.B, self.C, self.H, self.W = x.shape
        self.Np = (self.H // self.ph) * (self.W // self.pw)
        self.T = self.Np + self.E
        self.P = self.ph * self.pw * self.C
        self.A = self.h * self.kd


def _fake_saved(x: Tensor, cfg: Sequence[int]) -> list[Tensor]:
    s = _Sizes(x, cfg)
    f = dict(dtype=torch.float32, device=x.device)
    BT = s.B * s.T
    out = [x.new_empty((s.B * s.Np, s.P), **f)]
    for _ in range(s.L):
        out += [x.new_empty(shape, **f) for shape in (
            (BT, s.d), (BT, 1), (BT, 1), (BT, s.d), (BT, 3 * s.A), (s.B, s.h, s.T, s.T), (BT, s.A), (BT, s.d),
            (BT, 1), (BT, 1), (BT, s.d), (BT, s.M), (BT, s.M))]
    out += [x.new_empty((s.B, s.T * s.d), **f), x.new_empty((s.B, s.Hh), **f), x.new_empty((s.B, s.Hh), **f)]
    return out


# -- registration (once per extension) ---------------------------------------------------------------
_registered: set[str] = set()
_reg_lock = threading.Lock()


def _register_first_order_only(bwd_name: str) -> None:
    """Make differentiating the backward op ``bwd_name`` (double backward, ``create_graph=True`` then a
    second ``backward``) raise, naming the op. Without an autograd kernel, autograd differentiated
    through it as if it were constant and returned None / zero second-order gradients with only a
    UserWarning - a silent wrong answer. First-order gradients with ``create_graph=True`` still work."""
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, grads):
        raise NotImplementedError(
            f"{bwd_name} (the fused backward of the slvit_fast exit) has no derivative: second-order "
            "gradients (double backward) through the fused backends are not implemented; run the exit "
            "with backend='torch' for them")

    torch.library.register_autograd(bwd_name, backward, setup_context=setup_context)


def _register_cpu() -> None:
    @torch.library.register_fake("slvit_fast::cpu_exit_forward")
    def _fwd_fake(x, extra, params, cfg, eps, save):
        s = _Sizes(x, cfg)
        out = [x.new_empty((s.B, s.O))]
        return out + (_fake_saved(x, cfg) if save else [])

    @torch.library.register_fake("slvit_fast::cpu_exit_backward")
    def _bwd_fake(grad_out, x, extra, params, saved, cfg, eps, need_dx):
        dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
        dextra = torch.empty_like(extra) if extra is not None else x.new_empty((0,))
        return [dx, dextra] + [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]

    def setup_context(ctx, inputs, output):
        x, extra, params, cfg, eps, save = inputs
        ctx.has_saved = bool(save)
        ctx.cfg, ctx.eps, ctx.n_params, ctx.has_extra = list(cfg), eps, len(params), extra is not None
        ctx.save_for_backward(*saveable(x, extra, *params), *output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    def backward(ctx, grads):
        if not ctx.has_saved:
            raise RuntimeError("slvit_fast::cpu_exit_forward was run with save=False; it cannot be differentiated "
                               "(the cpu backend sets save=True whenever autograd needs it)")
        g = grads[0]
        tensors = ctx.saved_tensors
        x, extra = tensors[0], tensors[1]
        params = list(tensors[2:2 + ctx.n_params])
        saved = list(tensors[2 + ctx.n_params:])
        if g is None:
            g = x.new_zeros((x.shape[0], ctx.cfg[_CFG_INDEX["num_outputs"]]))
        need_dx = bool(ctx.needs_input_grad[0])
        res = torch.ops.slvit_fast.cpu_exit_backward(g, x, extra, params, saved, ctx.cfg, ctx.eps, need_dx)
        dx, dextra, dparams = (res[0] if need_dx else None), res[1], list(res[2:])
        return dx, (dextra if ctx.has_extra else None), dparams, None, None, None

    torch.library.register_autograd("slvit_fast::cpu_exit_forward", backward, setup_context=setup_context)
    _register_first_order_only("slvit_fast::cpu_exit_backward")


def _register_fwd_only(prefix: str) -> None:
    """Fake + autograd for ``{prefix}_exit_forward`` (emu / cuda): forward in two kernel launches;
    backward in two launches (``{prefix}_exit_backward``: backward kernel + gradient reduction, num_layers 1..4)."""
    name = f"slvit_fast::{prefix}_exit_forward"
    bwd_name = f"slvit_fast::{prefix}_exit_backward"

    @torch.library.register_fake(name)
    def _fwd_fake(x, extra, params, cfg, eps):
        s = _Sizes(x, cfg)
        return x.new_empty((s.B, s.O))

    @torch.library.register_fake(bwd_name)
    def _bwd_fake(grad_out, x, extra, params, cfg, eps, need_dx):
        dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
        dextra = torch.empty_like(extra, memory_format=torch.contiguous_format) if extra is not None else x.new_empty((0,))
        return [dx, dextra] + [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]

    bwd_op = getattr(torch.ops.slvit_fast, f"{prefix}_exit_backward")

    def setup_context(ctx, inputs, output):
        x, extra, params, cfg, eps = inputs
        ctx.cfg, ctx.eps = list(cfg), eps
        ctx.save_for_backward(*saveable(x, extra, *params))

    def backward(ctx, g):
        tensors = ctx.saved_tensors
        x, extra, params = tensors[0], tensors[1], list(tensors[2:])
        need_dx = bool(ctx.needs_input_grad[0])
        from ..profiling import record_launches

        record_launches("slvit_fast.cuda.exit_backward", 2)  # backward kernel + gradient reduction
        res = bwd_op(g, x, extra, params, ctx.cfg, ctx.eps, need_dx)
        return (res[0] if need_dx else None), (res[1] if extra is not None else None), list(res[2:]), None, None

    torch.library.register_autograd(name, backward, setup_context=setup_context)
    _register_first_order_only(bwd_name)


def reference_exit_from_list(x: Tensor, extra: Tensor | None, params: list[Tensor], cfg: Sequence[int],
                             eps: float) -> Tensor:
    """The reference exit from the op's (params list, cfg ints) arguments (no dropout)."""
    from ..config import SLViTConfig

    s = _Sizes(x, cfg)
    config = SLViTConfig(
        in_channels=s.C, feature_size=(s.H, s.W), patch_size=(s.ph, s.pw), embed_dim=s.d, num_heads=s.h,
        key_dim=s.kd, mlp_dim=s.M, head_hidden=s.Hh, num_outputs=s.O, extra_tokens=s.E, extra_dim=s.De,
        mlp_residual=s.residual, activation="gelu" if s.act == 0 else "relu", num_layers=s.L,
        ln_eps=float(eps),
    )
    return reference.slvit_exit(x, params, config, extra, training=False)


def ensure_registered(kind: str) -> str | None:
    """Load extension ``kind`` and register its Python parts; None if ready, else the reason."""
    if kind in _registered:  # lock-free fast path (also keeps torch.compile tracing simple)
        return None
    mod = native.load(kind)
    if mod is None:
        return native.load_error(kind) or f"extension for {kind!r} unavailable"
    with _reg_lock:
        if kind not in _registered:
            if kind == "cpu":
                _register_cpu()
            else:
                _register_fwd_only(kind)
            _registered.add(kind)
    return None


__all__ = ["CFG_FIELDS", "param_names", "module_params", "config_ints", "ensure_registered",
           "reference_exit_from_list"]
