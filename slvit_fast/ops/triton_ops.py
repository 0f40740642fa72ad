"""The Triton kernels of ``kernels/`` as ``torch.library`` custom ops with fake impls and autograd.

Three fused forward ops - one kernel launch each - make the SL-ViT exit:

* ``slvit_fast::triton_patch_embed``  patch extraction + embedding (+ pos, + extra tokens)
* ``slvit_fast::triton_attention``    ``t + MHA(LN(t))``, Keras semantics
* ``slvit_fast::triton_mlp_head``     ``t + MLP(LN(t))`` (residual optional) and, for the last layer,
                                      the flattening MLP head

and one backward op per forward op (one kernel launch each, plus one zero-fill of the fp32 buffer that
the per-sample programs accumulate weight gradients into with atomics, for attention and MLP).
Activations between the ops are float32 (B, T, D) whatever the model dtype; fp16/bf16 weights and
features are read in their dtype and every product accumulates in fp32. Launch shapes, block sizes and
``tl.dot`` precision live in :mod:`slvit_fast.ops.triton_launch`; the composition of the whole exit
from these ops in :mod:`slvit_fast.backends.triton_backend`.

Weight gradients of the attention and MLP/head backward kernels (one program per sample) are summed
over the batch with fp32 atomics, so they are not bitwise deterministic run to run (the patch-embedding
backward has one program per weight column block and no atomics).

Registration uses ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` (the backward
ops are custom ops too), so ``torch.compile(fullgraph=True)`` sees opaque ops and ``opcheck`` passes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..profiling import record_launches
from .saved import saveable
from .triton_launch import (F32, attention_bwd_launch, attention_fwd_launch, mlp_head_bwd_launch,
                            mlp_head_fwd_launch, patch_embed_bwd_launch, patch_embed_fwd_launch)


def _split(flat: Tensor, shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> list[Tensor]:
    grads, off = [], 0
    for shape, dt in zip(shapes, dtypes):
        n = math.prod(shape)
        grads.append(flat[off:off + n].view(shape).to(dt))
        off += n
    return grads


def _zeros_launch(flat: Tensor) -> None:
    # the zero-fill of an atomic accumulation buffer is a GPU kernel too: count it honestly
    if flat.device.type == "cuda":
        record_launches("zero_fill_grad_accumulators", 1)


# ---------------------------------------------------------------------------------------------------
# patch embedding
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("slvit_fast::triton_patch_embed", mutates_args=())
def triton_patch_embed(x: Tensor, w: Tensor, bias: Tensor, pos: Tensor, extra: Optional[Tensor],
                       we: Optional[Tensor], be: Optional[Tensor], ph: int, pw: int) -> Tensor:
    B, C, H, W = x.shape
    T = (H // ph) * (W // pw) + (extra.shape[1] if extra is not None else 0)
    out = torch.empty(B, T, w.shape[0], device=x.device, dtype=F32)
    extra = extra.contiguous() if extra is not None else None
    patch_embed_fwd_launch(x, w, bias, pos, extra, we, be, ph, pw, out).run()
    return out


@triton_patch_embed.register_fake
def _(x, w, bias, pos, extra, we, be, ph, pw):
    B, C, H, W = x.shape
    T = (H // ph) * (W // pw) + (extra.shape[1] if extra is not None else 0)
    return x.new_empty((B, T, w.shape[0]), dtype=F32)


@torch.library.custom_op("slvit_fast::triton_patch_embed_bwd", mutates_args=())
def triton_patch_embed_bwd(g: Tensor, x: Tensor, w: Tensor, extra: Optional[Tensor], we: Optional[Tensor],
                           ph: int, pw: int) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dextra (empty without extra), flat fp32 [dW, dbias, dpos, dWe, dbe])."""
    B, C, H, W = x.shape
    D, K = w.shape
    N = (H // ph) * (W // pw)
    DE = extra.shape[2] if extra is not None else 0
    flat = torch.empty(D * K + D + N * D + (D * DE + D if extra is not None else 0), device=x.device, dtype=F32)
    dx = torch.empty_like(x)
    if extra is not None:
        extra = extra.contiguous()
        dextra = torch.empty_like(extra)
    else:
        dextra = x.new_empty((0,))
    patch_embed_bwd_launch(x, w, extra, we, g.contiguous(), ph, pw, dx, dextra, flat).run()
    return dx, dextra, flat


@triton_patch_embed_bwd.register_fake
def _(g, x, w, extra, we, ph, pw):
    B, C, H, W = x.shape
    D, K = w.shape
    N = (H // ph) * (W // pw)
    DE = extra.shape[2] if extra is not None else 0
    n = D * K + D + N * D + (D * DE + D if extra is not None else 0)
    dextra = torch.empty_like(extra) if extra is not None else x.new_empty((0,))
    return torch.empty_like(x), dextra, x.new_empty((n,), dtype=F32)


def _pe_setup(ctx, inputs, output):
    x, w, bias, pos, extra, we, be, ph, pw = inputs
    ctx.save_for_backward(*saveable(x, w, extra, we))
    ctx.ph, ctx.pw = ph, pw
    ctx.has_extra = extra is not None
    ctx.meta = (bias.shape, bias.dtype, pos.shape, pos.dtype)


def _pe_backward(ctx, g):
    x, w, extra, we = ctx.saved_tensors
    extra = extra if ctx.has_extra else None
    we = we if ctx.has_extra else None
    dx, dextra, flat = triton_patch_embed_bwd(g, x, w, extra, we, ctx.ph, ctx.pw)
    bshape, bdtype, pshape, pdtype = ctx.meta
    shapes, dtypes = [tuple(w.shape), tuple(bshape), tuple(pshape)], [w.dtype, bdtype, pdtype]
    if extra is not None:
        shapes += [tuple(we.shape), (we.shape[0],)]
        dtypes += [we.dtype, we.dtype]
    grads = _split(flat, shapes, dtypes)
    dw, dbias, dpos = grads[:3]
    dwe, dbe = (grads[3], grads[4]) if extra is not None else (None, None)
    return dx, dw, dbias, dpos, (dextra if extra is not None else None), dwe, dbe, None, None


triton_patch_embed.register_autograd(_pe_backward, setup_context=_pe_setup)


# ---------------------------------------------------------------------------------------------------
# attention block
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("slvit_fast::triton_attention", mutates_args=())
def triton_attention(t: Tensor, lnw: Tensor, lnb: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor,
                     wv: Tensor, bv: Tensor, wo: Tensor, bo: Tensor, num_heads: int, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, mean, rstd, q, k, v, o, lse); everything after ``out`` is saved for backward."""
    outs = _attention_outputs(t, wq.shape[0], num_heads)
    attention_fwd_launch(t.contiguous(), lnw, lnb, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, outs).run()
    return outs


def _attention_outputs(t: Tensor, A: int, H: int) -> tuple[Tensor, ...]:
    B, T, D = t.shape
    KD = A // H
    e = lambda *s: t.new_empty(s, dtype=F32)  # noqa: E731
    return e(B, T, D), e(B, T), e(B, T), e(B, H, T, KD), e(B, H, T, KD), e(B, H, T, KD), e(B, T, A), e(B, H, T)


@triton_attention.register_fake
def _(t, lnw, lnb, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps):
    return _attention_outputs(t, wq.shape[0], num_heads)


@torch.library.custom_op("slvit_fast::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(g: Tensor, t: Tensor, lnw: Tensor, lnb: Tensor, wq: Tensor, wk: Tensor, wv: Tensor,
                         wo: Tensor, mean: Tensor, rstd: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                         lse: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """Returns (dt, flat fp32 [dlnw, dlnb, dWq, dbq, dWk, dbk, dWv, dbv, dWo, dbo])."""
    B, T, D = t.shape
    A = wq.shape[0]
    flat = torch.zeros(2 * D + 4 * A * D + 3 * A + D, device=t.device, dtype=F32)
    _zeros_launch(flat)
    dt = torch.empty_like(t, dtype=F32)
    scratch = (q.new_empty(q.shape), lse.new_empty(lse.shape), q.new_empty(q.shape), q.new_empty(q.shape),
               q.new_empty(q.shape))
    attention_bwd_launch(t.contiguous(), g.contiguous().to(F32), lnw, lnb, wq, wk, wv, wo, mean, rstd, q, k, v,
                         o, lse, num_heads, dt, scratch, flat).run()
    return dt, flat


@triton_attention_bwd.register_fake
def _(g, t, lnw, lnb, wq, wk, wv, wo, mean, rstd, q, k, v, o, lse, num_heads):
    B, T, D = t.shape
    A = wq.shape[0]
    return t.new_empty(t.shape, dtype=F32), t.new_empty((2 * D + 4 * A * D + 3 * A + D,), dtype=F32)


def _attn_setup(ctx, inputs, output):
    t, lnw, lnb, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps = inputs
    out, mean, rstd, q, k, v, o, lse = output
    ctx.mark_non_differentiable(mean, rstd, q, k, v, o, lse)
    ctx.save_for_backward(*saveable(t, lnw, lnb, wq, wk, wv, wo), mean, rstd, q, k, v, o, lse)
    ctx.num_heads = num_heads
    ctx.dtypes = [p.dtype for p in (lnw, lnb, wq, bq, wk, bk, wv, bv, wo, bo)]
    ctx.shapes = [tuple(p.shape) for p in (lnw, lnb, wq, bq, wk, bk, wv, bv, wo, bo)]


def _attn_backward(ctx, g, *unused):
    saved = ctx.saved_tensors
    t = saved[0]
    if g is None:
        g = torch.zeros_like(t)
    dt, flat = triton_attention_bwd(g, *saved, ctx.num_heads)
    grads = _split(flat, ctx.shapes, ctx.dtypes)
    return (dt.to(t.dtype), *grads, None, None)


triton_attention.register_autograd(_attn_backward, setup_context=_attn_setup)


# ---------------------------------------------------------------------------------------------------
# MLP block + flattening head
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("slvit_fast::triton_mlp_head", mutates_args=())
def triton_mlp_head(t: Tensor, lnw: Tensor, lnb: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                    hw1: Optional[Tensor], hb1: Optional[Tensor], hw2: Optional[Tensor], hb2: Optional[Tensor],
                    eps: float, residual: bool, act: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (logits (B, O) in the head's dtype - (B, 0) without head -, out (B, T, D) fp32, mean, rstd,
    hpre (B, head_hidden) fp32, the head's pre-activation)."""
    logits, out, mean, rstd, hpre = _mlp_outputs(t, hw1, hw2)
    mlp_head_fwd_launch(t.contiguous(), lnw, lnb, w1, b1, w2, b2, hw1, hb1, hw2, hb2, eps, residual, act,
                        (out, mean, rstd, hpre, logits)).run()
    return logits, out, mean, rstd, hpre


def _mlp_outputs(t, hw1, hw2):
    B, T, D = t.shape
    if hw1 is not None:
        logits = t.new_empty((B, hw2.shape[0]), dtype=hw2.dtype)
        hpre = t.new_empty((B, hw1.shape[0]), dtype=F32)
    else:
        logits = t.new_empty((B, 0), dtype=F32)
        hpre = t.new_empty((B, 0), dtype=F32)
    return logits, t.new_empty((B, T, D), dtype=F32), t.new_empty((B, T), dtype=F32), \
        t.new_empty((B, T), dtype=F32), hpre


@triton_mlp_head.register_fake
def _(t, lnw, lnb, w1, b1, w2, b2, hw1, hb1, hw2, hb2, eps, residual, act):
    return _mlp_outputs(t, hw1, hw2)


@torch.library.custom_op("slvit_fast::triton_mlp_head_bwd", mutates_args=())
def triton_mlp_head_bwd(dlogits: Optional[Tensor], gout: Optional[Tensor], t: Tensor, out: Tensor, lnw: Tensor,
                        lnb: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, mean: Tensor, rstd: Tensor,
                        hw1: Optional[Tensor], hw2: Optional[Tensor], hpre: Optional[Tensor], residual: bool,
                        act: int) -> tuple[Tensor, Tensor]:
    """Returns (dt, flat fp32 [dlnw, dlnb, dW1, db1, dW2, db2, (dhW1, dhb1, dhW2, dhb2)])."""
    B, T, D = t.shape
    flat = torch.zeros(_mlp_flat_size(t, w1, hw1, hw2), device=t.device, dtype=F32)
    _zeros_launch(flat)
    dt = torch.empty_like(t, dtype=F32)
    has_head = hw1 is not None
    dflat = t.new_empty((B, T * D), dtype=F32) if has_head else t.new_empty((1,), dtype=F32)
    dhpre = t.new_empty((B, hw1.shape[0]), dtype=F32) if has_head else dflat
    mlp_head_bwd_launch(
        dlogits.contiguous() if (has_head and dlogits is not None) else None,
        gout.contiguous().to(F32) if gout is not None else None,
        t.contiguous(), out, lnw, lnb, w1, b1, w2, mean, rstd, hw1, hw2, hpre, residual, act, dt, dflat, dhpre,
        flat,
    ).run()
    return dt, flat


def _mlp_flat_size(t, w1, hw1, hw2) -> int:
    B, T, D = t.shape
    Fd = w1.shape[0]
    n = 3 * D + 2 * Fd * D + Fd
    if hw1 is not None:
        HH, O = hw1.shape[0], hw2.shape[0]
        n += HH * T * D + HH + O * HH + O
    return n


@triton_mlp_head_bwd.register_fake
def _(dlogits, gout, t, out, lnw, lnb, w1, b1, w2, mean, rstd, hw1, hw2, hpre, residual, act):
    return t.new_empty(t.shape, dtype=F32), t.new_empty((_mlp_flat_size(t, w1, hw1, hw2),), dtype=F32)


def _mlp_setup(ctx, inputs, output):
    t, lnw, lnb, w1, b1, w2, b2, hw1, hb1, hw2, hb2, eps, residual, act = inputs
    logits, out, mean, rstd, hpre = output
    ctx.mark_non_differentiable(mean, rstd, hpre)
    ctx.has_head = hw1 is not None
    ctx.residual, ctx.act = residual, act
    ctx.save_for_backward(*saveable(t), out, *saveable(lnw, lnb, w1, b1, w2), mean, rstd,
                          *((*saveable(hw1, hw2), hpre) if ctx.has_head else ()))
    params = [lnw, lnb, w1, b1, w2, b2] + ([hw1, hb1, hw2, hb2] if ctx.has_head else [])
    ctx.shapes = [tuple(p.shape) for p in params]
    ctx.dtypes = [p.dtype for p in params]


def _mlp_backward(ctx, dlogits, gout, *unused):
    saved = ctx.saved_tensors
    t, out, lnw, lnb, w1, b1, w2, mean, rstd = saved[:9]
    hw1, hw2, hpre = saved[9:] if ctx.has_head else (None, None, None)
    if not ctx.has_head:
        dlogits = None
    if dlogits is None and gout is None:
        gout = torch.zeros_like(out)
    dt, flat = triton_mlp_head_bwd(dlogits, gout, t, out, lnw, lnb, w1, b1, w2, mean, rstd, hw1, hw2, hpre,
                                   ctx.residual, ctx.act)
    grads = _split(flat, ctx.shapes, ctx.dtypes)
    head = grads[6:] if ctx.has_head else [None] * 4
    return (dt.to(t.dtype), *grads[:6], *head, None, None, None)


triton_mlp_head.register_autograd(_mlp_backward, setup_context=_mlp_setup)


__all__ = ["triton_patch_embed", "triton_attention", "triton_mlp_head"]
