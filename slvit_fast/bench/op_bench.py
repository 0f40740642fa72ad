"""Per-op benchmark cases: each fused unit of the exit (patch embedding, attention block, MLP block,
flattening head) on eager PyTorch and ``torch.compile``; the Triton ops join on a CUDA device.

The CPU backend fuses the whole exit into one op, so on this machine it appears only in the
whole-exit benchmark (:mod:`slvit_fast.bench.exit_bench`).
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import reference
from ..slvit_exit import SLViTExit

OPS = ("patch_embed", "attention_block", "mlp_block", "flatten_head")


def _op_fn(op: str, m: SLViTExit) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The reference function of ``op`` bound to ``m``'s weights, and which input it takes."""
    c, L = m.config, m.layers[0]
    if op == "patch_embed":
        return (lambda x: reference.patch_embed(x, m.patch_embed.weight, m.patch_embed.bias, m.pos_embed,
                                                c.patch_size)), "features"
    if op == "attention_block":
        a = L.attn
        return (lambda t: reference.attention_block(t, L.norm1.weight, L.norm1.bias, a.q.weight, a.q.bias, a.k.weight,
                                                    a.k.bias, a.v.weight, a.v.bias, a.out.weight, a.out.bias,
                                                    c.num_heads, c.ln_eps)), "tokens"
    if op == "mlp_block":
        return (lambda t: reference.mlp_block(t, L.norm2.weight, L.norm2.bias, L.mlp.fc1.weight, L.mlp.fc1.bias,
                                              L.mlp.fc2.weight, L.mlp.fc2.bias, c.ln_eps, c.mlp_residual)), "tokens"
    if op == "flatten_head":
        h = m.head
        return (lambda t: reference.flatten_head(t, h.fc1.weight, h.fc1.bias, h.fc2.weight, h.fc2.bias,
                                                 c.activation)), "tokens"
    raise ValueError(f"unknown op {op!r}; valid: {OPS}")


def build_op_call(op: str, preset: str, batch: int, impl: str, mode: str = "inference",
                  device: str = "cpu") -> Callable[[], object]:
    """A zero-argument callable running ``op`` once (forward, or forward+backward for mode='train')."""
    if impl not in ("eager", "compile"):
        raise NotImplementedError(f"per-op benchmark for implementation {impl!r} (the CPU backend fuses the "
                                  "whole exit; Triton ops are benchmarked on CUDA devices only)")
    torch.manual_seed(0)
    m = SLViTExit.from_preset(preset, backend="torch").to(device)
    m.train(mode == "train")
    c = m.config
    fn, takes = _op_fn(op, m)
    if impl == "compile":
        fn = torch.compile(fn)
    if takes == "features":
        inp = torch.randn(batch, c.in_channels, *c.feature_size, device=device)
    else:
        inp = torch.randn(batch, c.num_patches, c.embed_dim, device=device)
    if mode == "inference":
        def run():
            with torch.inference_mode():
                return fn(inp)
        return run
    inp.requires_grad_(True)

    def step():
        out = fn(inp)
        out.sum().backward()
        return out
    return step
