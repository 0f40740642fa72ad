"""Torch ops of the compiled C++ / CUDA backends: fake (meta) implementations and autograd.

The ops themselves are defined in C++ (``TORCH_LIBRARY_FRAGMENT(slvit_fast, ...)`` in csrc/):

- ``slvit_fast::cpu_exit_forward(x, extra, params, cfg, eps, save) -> Tensor[]``: the whole exit on
  CPU; returns ``[logits]`` or, with ``save=True``, ``[logits, *saved activations]`` (float32).
- ``slvit_fast::cpu_exit_backward(grad_out, x, extra, params, saved, cfg, eps) -> Tensor[]``:
  ``[dx, dextra (empty if no extra), *dparams]``.
- ``slvit_fast::emu_exit_forward`` / ``slvit_fast::cuda_exit_forward(x, extra, params, cfg, eps)
  -> Tensor``: the CUDA kernels (two launches), under the SIMT emulator or on a GPU.
- ``slvit_fast::emu_exit_backward`` / ``slvit_fast::cuda_exit_backward(grad_out, x, extra, params, cfg,
  eps, need_dx) -> Tensor[]``: the backward kernel (one launch; num_layers == 1), same outputs as
  ``cpu_exit_backward``.

This module registers the Python parts (``register_fake``, ``register_autograd``) once the extension
is loaded, and turns an :class:`~slvit_fast.SLViTExit` into the ``params`` list and ``cfg`` ints.
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch
from torch import Tensor

from .. import native, reference

CFG_FIELDS = ("ph", "pw", "d", "heads", "key_dim", "mlp_dim", "head_hidden", "num_outputs", "extra_tokens",
              "extra_dim", "mlp_residual", "activation", "num_layers")
SAVED_PER_LAYER = 13
LAYER_PARAM_NAMES = (
    "norm1.weight", "norm1.bias", "attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias",
    "attn.v.weight", "attn.v.bias", "attn.out.weight", "attn.out.bias", "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)


def param_names(config) -> list[str]:
    """Parameter names of an SLViTExit in the order the C++ ops take them."""
    names = ["patch_embed.weight", "patch_embed.bias", "pos_embed"]
    if config.extra_tokens:
        names += ["extra_embed.weight", "extra_embed.bias"]
    for i in range(config.num_layers):
        names += [f"layers.{i}.{n}" for n in LAYER_PARAM_NAMES]
    names += ["head.fc1.weight", "head.fc1.bias", "head.fc2.weight", "head.fc2.bias"]
    return names


def module_params(module) -> list[Tensor]:
    """The exit's parameters in op order.

    Read straight from the ``_parameters`` / ``_modules`` dicts: the same objects attribute access
    returns, looked up afresh on every call (a replaced parameter is always seen), at a fraction of
    nn.Module.__getattr__'s cost - which at batch 1 was a sizeable share of a whole fused exit call.
    """
    c = module.config
    mods = module._modules

    def wb(m):
        p = m._parameters
        return [p["weight"], p["bias"]]

    ps = wb(mods["patch_embed"]) + [module._parameters["pos_embed"]]
    if c.extra_tokens:
        ps += wb(mods["extra_embed"])
    for layer in mods["layers"]._modules.values():
        lm = layer._modules
        a, m = lm["attn"]._modules, lm["mlp"]._modules
        ps += (wb(lm["norm1"]) + wb(a["q"]) + wb(a["k"]) + wb(a["v"]) + wb(a["out"]) + wb(lm["norm2"])
               + wb(m["fc1"]) + wb(m["fc2"]))
    h = mods["head"]._modules
    ps += wb(h["fc1"]) + wb(h["fc2"])
    return ps


def config_ints(config) -> list[int]:
    c = config
    return [c.patch_size[0], c.patch_size[1], c.embed_dim, c.num_heads, c.key_dim, c.mlp_dim, c.head_hidden,
            c.num_outputs, c.extra_tokens, c.extra_dim, int(c.mlp_residual), 0 if c.activation == "gelu" else 1,
            c.num_layers]


class _Sizes:
    def __init__(self, x: Tensor, cfg: Sequence[int]):
        (self.ph, self.pw, self.d, self.h, self.kd, self.M, self.Hh, self.O, self.E, self.De, _res, _act,
         self.L) = (int(v) for v in cfg)
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
        ctx.save_for_backward(x, extra, *params, *output[1:])
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
            g = x.new_zeros((x.shape[0], ctx.cfg[7]))
        need_dx = bool(ctx.needs_input_grad[0])
        res = torch.ops.slvit_fast.cpu_exit_backward(g, x, extra, params, saved, ctx.cfg, ctx.eps, need_dx)
        dx, dextra, dparams = (res[0] if need_dx else None), res[1], list(res[2:])
        return dx, (dextra if ctx.has_extra else None), dparams, None, None, None

    torch.library.register_autograd("slvit_fast::cpu_exit_forward", backward, setup_context=setup_context)


def _register_fwd_only(prefix: str) -> None:
    """Fake + autograd for ``{prefix}_exit_forward`` (emu / cuda): forward in two kernel launches;
    backward in one launch of the backward kernel (``{prefix}_exit_backward``, num_layers == 1), or the
    reference math recomputed in torch for deeper exits."""
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
        ctx.save_for_backward(x, extra, *params)

    def backward(ctx, g):
        tensors = ctx.saved_tensors
        x, extra, params = tensors[0], tensors[1], list(tensors[2:])
        if int(ctx.cfg[12]) == 1:
            need_dx = bool(ctx.needs_input_grad[0])
            from ..profiling import record_launches

            record_launches("slvit_fast.cuda.exit_backward", 1)
            res = bwd_op(g, x, extra, params, ctx.cfg, ctx.eps, need_dx)
            return (res[0] if need_dx else None), (res[1] if extra is not None else None), list(res[2:]), None, None
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            es = extra.detach().requires_grad_(True) if extra is not None else None
            ps = [p.detach().requires_grad_(True) for p in params]
            out = reference_exit_from_list(xs, es, ps, ctx.cfg, ctx.eps)
            inputs = [xs] + ([es] if es is not None else []) + ps
            grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
        dx = grads[0]
        dextra = grads[1] if es is not None else None
        dps = list(grads[2:] if es is not None else grads[1:])
        return dx, dextra, dps, None, None

    torch.library.register_autograd(name, backward, setup_context=setup_context)


def reference_exit_from_list(x: Tensor, extra: Tensor | None, params: list[Tensor], cfg: Sequence[int],
                             eps: float) -> Tensor:
    """The reference exit from the op's (params list, cfg ints) arguments (no dropout)."""
    from ..config import SLViTConfig

    s = _Sizes(x, cfg)
    config = SLViTConfig(
        in_channels=s.C, feature_size=(s.H, s.W), patch_size=(s.ph, s.pw), embed_dim=s.d, num_heads=s.h,
        key_dim=s.kd, mlp_dim=s.M, head_hidden=s.Hh, num_outputs=s.O, extra_tokens=s.E, extra_dim=s.De,
        mlp_residual=bool(cfg[10]), activation="gelu" if int(cfg[11]) == 0 else "relu", num_layers=s.L,
        ln_eps=float(eps),
    )
    return reference.slvit_exit(x, dict(zip(param_names(config), params)), config, extra, training=False)


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
