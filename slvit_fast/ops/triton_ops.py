"""The Triton kernels of ``kernels/`` as ``torch.library`` custom ops with fake impls and autograd.

Three fused forward ops - one kernel launch each - make the SL-ViT exit:

* ``slvit_fast::triton_patch_embed``  patch extraction + embedding (+ pos, + extra tokens)
* ``slvit_fast::triton_attention``    ``t + MHA(LN(t))``, Keras semantics
* ``slvit_fast::triton_mlp_head``     ``t + MLP(LN(t))`` (residual optional) and, for the last layer,
                                      the flattening MLP head

and one backward op per forward op (one kernel launch each, plus one zero-fill of the fp32 buffer that
the per-sample programs accumulate weight gradients into with atomics, for attention and MLP).
Activations between the ops are float32 (B, T, D) whatever the model dtype; fp16/bf16 weights and
features are read in their dtype and every product accumulates in fp32. ``tl.dot`` precision: see
:func:`_prec` (IEEE fp32 under the interpreter; on GPUs 3xTF32 / TF32 for fp32 models following
``torch.get_float32_matmul_precision()``, TF32 for fp16/bf16 models).

Weight gradients of the attention and MLP/head backward kernels (one program per sample) are summed
over the batch with fp32 atomics, so they are not bitwise deterministic run to run (the patch-embedding
backward has one program per weight column block and no atomics).

Registration uses ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` (the backward
ops are custom ops too), so ``torch.compile(fullgraph=True)`` sees opaque ops and ``opcheck`` passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
from torch import Tensor

from slvit_fast.kernels.attention_block import attention_bwd_kernel, attention_fwd_kernel
from slvit_fast.kernels.mlp_head import mlp_head_bwd_kernel, mlp_head_fwd_kernel
from slvit_fast.kernels.patch_embed import patch_embed_bwd_kernel, patch_embed_fwd_kernel

from ..profiling import record_launches

F32 = torch.float32
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NUM_WARPS = 8
# ptxas otherwise caps some of these kernels at 128 registers (2 CTAs/SM) and spills; one 256-thread
# CTA per sample with up to 255 registers is the intended shape.
MAXNREG = 255
NUM_STAGES = 1  # no software pipelining: the loops are latency-bound per sample and registers are tight
# Block sizes. Compiled (GPU) sizes are chosen for 0 register spills (see ``slvit-fast gpu-report``).
# Under the interpreter (CPU tests) the same kernels run with larger blocks: each interpreted block
# operation costs ~1 ms of Python whatever its size, so bigger blocks make the suite 3-10x faster.
# Every multi-block / masked path is still exercised (T = 144 tokens is 3 blocks of 64, etc.).
# C_EMBED: channel chunk of the patch embedding (capped by the channel count); K_EMBED: chunk of the
# extra tokens' input width.
# *_BWD: the MLP backward transposes computed tiles for its weight gradients; smaller tiles keep it
# spill-free.
COMPILED_BLOCKS = dict(T=32, T_ATTN=32, C_EMBED=32, K_EMBED=64, F=64, H=16, K_HEAD=128, O=16, T_BWD=16, F_BWD=32,
                       T_ATTN_BWD=16)
INTERPRETER_BLOCKS = dict(T=64, T_ATTN=64, C_EMBED=512, K_EMBED=512, F=256, H=64, K_HEAD=1024, O=64, T_BWD=64,
                          F_BWD=256, T_ATTN_BWD=64)


# 3xTF32 dots (fp32 models at "highest" precision) hold hi/lo operand splits: smaller tiles.
COMPILED_BLOCKS_TF32X3 = {**COMPILED_BLOCKS, "T": 16, "T_ATTN": 16, "C_EMBED": 16}


def blocks(prec: str = "tf32") -> dict[str, int]:
    if interpreted():
        return INTERPRETER_BLOCKS
    return COMPILED_BLOCKS_TF32X3 if prec == "tf32x3" else COMPILED_BLOCKS


ACTIVATIONS = {"gelu": 0, "relu": 1}


def _p2(n: int, lo: int = 16) -> int:
    """Next power of two >= max(n, lo): ``tl.dot`` wants every dimension >= 16 when compiled."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(attention_fwd_kernel, InterpretedFunction)


_INTERPRETED = _is_interpreted()


def interpreted() -> bool:
    """True when the kernels are Triton interpreter objects (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


# fp32 "highest" on a GPU: "tf32x3" (3xTF32 split products on tensor cores, ~fp32 accuracy) rather than
# "ieee" (FMA dots hold whole K-slices of both operands per thread and spill at these tile sizes; see
# ``slvit-fast gpu-report --dtypes float32-ieee``).
FP32_EXACT_GPU_PRECISION = "tf32x3"


def _prec(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision. fp16/bf16 models: TF32 on fp32-converted operands (fp32 accumulate).
    fp32 models: IEEE fp32 in the interpreter (exact mode, what the tests check); on a GPU they follow
    torch's global fp32 matmul setting: ``torch.get_float32_matmul_precision() == "highest"`` (torch's
    default) gives 3xTF32 (~fp32 accuracy), "high"/"medium" give TF32."""
    if dtype != torch.float32:
        return "tf32"
    if interpreted():
        return "ieee"
    if torch.get_float32_matmul_precision() == "highest":
        return FP32_EXACT_GPU_PRECISION
    return "tf32"


@dataclass
class Launch:
    """One kernel launch, fully described: used to launch it and (gpu_report) to compile it AOT."""

    name: str
    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    meta: dict[str, Any]
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES
    maxnreg: Optional[int] = MAXNREG

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg is not None and not interpreted():
            opts["maxnreg"] = self.maxnreg
        return opts

    def run(self) -> None:
        self.kernel[self.grid](**self.args, **self.meta, **self.options())
        record_launches(self.name, 1)


# ---------------------------------------------------------------------------------------------------
# launch descriptions (shared by the ops below and by slvit_fast.gpu_report)
# ---------------------------------------------------------------------------------------------------

def patch_embed_fwd_launch(x, w, bias, pos, extra, we, be, ph: int, pw: int, out: Tensor) -> Launch:
    B, C, H, W = x.shape
    D, K = w.shape
    gw = W // pw
    N = (H // ph) * gw
    E, DE = (extra.shape[1], extra.shape[2]) if extra is not None else (0, 0)
    args = dict(
        x_ptr=x, w_ptr=w, bias_ptr=bias, pos_ptr=pos,
        extra_ptr=extra if extra is not None else w, we_ptr=we if we is not None else w,
        be_ptr=be if be is not None else bias, out_ptr=out,
        sb=x.stride(0), sc=x.stride(1), sh=x.stride(2), sw=x.stride(3),
        C=C, GW=gw, N=N, T=N + E, D=D, K=K, E=E, DE=DE, PH=ph, PW=pw,
    )
    bs = blocks(_prec(w.dtype))
    meta = dict(HAS_EXTRA=extra is not None, BT=bs["T"], BD=_p2(D), BC=min(bs["C_EMBED"], _p2(C)),
                BK=bs["K_EMBED"], BE=_p2(E), PREC=_prec(w.dtype))
    return Launch("triton_patch_embed_fwd", patch_embed_fwd_kernel, (B, triton.cdiv(N, bs["T"])), args, meta)


def patch_embed_bwd_launch(x, w, extra, we, g, ph, pw, dx, dextra, flat) -> Launch:
    B, C, H, W = x.shape
    D, K = w.shape
    gw = W // pw
    N = (H // ph) * gw
    E, DE = (extra.shape[1], extra.shape[2]) if extra is not None else (0, 0)
    o_bias = D * K
    o_pos = o_bias + D
    o_we = o_pos + N * D
    o_be = o_we + D * DE
    has_extra = extra is not None
    args = dict(
        x_ptr=x, w_ptr=w, extra_ptr=extra if has_extra else w, we_ptr=we if has_extra else w, g_ptr=g,
        dx_ptr=dx, dw_ptr=flat, dbias_ptr=flat[o_bias:], dpos_ptr=flat[o_pos:],
        dextra_ptr=dextra if has_extra else dx, dwe_ptr=flat[o_we:] if has_extra else flat,
        dbe_ptr=flat[o_be:] if has_extra else flat,
        sb=x.stride(0), sc=x.stride(1), sh=x.stride(2), sw=x.stride(3),
        dsb=dx.stride(0), dsc=dx.stride(1), dsh=dx.stride(2), dsw=dx.stride(3),
        B=B, C=C, GW=gw, N=N, T=N + E, D=D, K=K, E=E, DE=DE, PH=ph, PW=pw,
    )
    bs = blocks(_prec(w.dtype))
    bc = min(bs["C_EMBED"], _p2(C))
    meta = dict(HAS_EXTRA=has_extra, BR=bs["T"], BD=_p2(D), BC=bc, BK=bs["K_EMBED"], PREC=_prec(w.dtype))
    grid = (ph * pw * triton.cdiv(C, bc) + 1 + int(has_extra),)
    return Launch("triton_patch_embed_bwd", patch_embed_bwd_kernel, grid, args, meta)


def attention_fwd_launch(t, lnw, lnb, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, outs) -> Launch:
    B, T, D = t.shape
    KD = wq.shape[0] // num_heads
    out, mean, rstd, q, k, v, o, lse = outs
    args = dict(
        t_ptr=t, out_ptr=out, lnw_ptr=lnw, lnb_ptr=lnb, wq_ptr=wq, bq_ptr=bq, wk_ptr=wk, bk_ptr=bk,
        wv_ptr=wv, bv_ptr=bv, wo_ptr=wo, bo_ptr=bo, mean_ptr=mean, rstd_ptr=rstd,
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=o, lse_ptr=lse,
        T=T, D=D, KD=KD, H=num_heads, eps=float(eps), scale=1.0 / math.sqrt(KD),
    )
    meta = dict(BT=blocks(_prec(wq.dtype))['T_ATTN'], BD=_p2(D), BKD=_p2(KD), PREC=_prec(wq.dtype))
    return Launch("triton_attention_fwd", attention_fwd_kernel, (B,), args, meta)


def attention_bwd_launch(t, g, lnw, lnb, wq, wk, wv, wo, mean, rstd, q, k, v, o, lse, num_heads,
                         dt, scratch, flat) -> Launch:
    B, T, D = t.shape
    A = wq.shape[0]
    KD = A // num_heads
    do, delta, dq, dk, dv = scratch
    offs = _offsets([D, D, A * D, A, A * D, A, A * D, A, D * A, D])
    names = ["dlnw", "dlnb", "dwq", "dbq", "dwk", "dbk", "dwv", "dbv", "dwo", "dbo"]
    args = dict(
        t_ptr=t, g_ptr=g, dt_ptr=dt, lnw_ptr=lnw, lnb_ptr=lnb, wq_ptr=wq, wk_ptr=wk, wv_ptr=wv, wo_ptr=wo,
        mean_ptr=mean, rstd_ptr=rstd, q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=o, lse_ptr=lse,
        do_ptr=do, delta_ptr=delta, dq_ptr=dq, dk_ptr=dk, dv_ptr=dv,
        **{n + "_ptr": flat[off:] for n, off in zip(names, offs)},
        T=T, D=D, KD=KD, H=num_heads, scale=1.0 / math.sqrt(KD),
    )
    meta = dict(BT=blocks(_prec(wq.dtype))['T_ATTN_BWD'], BD=_p2(D), BKD=_p2(KD), PREC=_prec(wq.dtype))
    return Launch("triton_attention_bwd", attention_bwd_kernel, (B,), args, meta)


def mlp_head_fwd_launch(t, lnw, lnb, w1, b1, w2, b2, hw1, hb1, hw2, hb2, eps, residual, act, outs) -> Launch:
    B, T, D = t.shape
    Fd = w1.shape[0]
    has_head = hw1 is not None
    HH, O = (hw1.shape[0], hw2.shape[0]) if has_head else (0, 0)
    out, mean, rstd, hpre, logits = outs
    args = dict(
        t_ptr=t, out_ptr=out, lnw_ptr=lnw, lnb_ptr=lnb, w1_ptr=w1, b1_ptr=b1, w2_ptr=w2, b2_ptr=b2,
        mean_ptr=mean, rstd_ptr=rstd,
        hw1_ptr=hw1 if has_head else w1, hb1_ptr=hb1 if has_head else b1,
        hw2_ptr=hw2 if has_head else w2, hb2_ptr=hb2 if has_head else b2,
        hpre_ptr=hpre if has_head else mean, logits_ptr=logits if has_head else w1,
        T=T, D=D, F=Fd, HH=HH, O=O, eps=float(eps),
    )
    bs = blocks(_prec(w1.dtype))
    meta = dict(RESIDUAL=bool(residual), HAS_HEAD=has_head, ACT=int(act), BT=bs["T"], BD=_p2(D), BF=bs["F"],
                BH=bs["H"], BK=bs["K_HEAD"], BO=bs["O"], PREC=_prec(w1.dtype))
    return Launch("triton_mlp_head_fwd", mlp_head_fwd_kernel, (B,), args, meta)


def mlp_head_bwd_launch(dlogits, gout, t, out, lnw, lnb, w1, b1, w2, mean, rstd, hw1, hw2, hpre, residual, act,
                        dt, dflat, dhpre, flat) -> Launch:
    B, T, D = t.shape
    Fd = w1.shape[0]
    has_head = hw1 is not None
    HH, O = (hw1.shape[0], hw2.shape[0]) if has_head else (0, 0)
    sizes = [D, D, Fd * D, Fd, D * Fd, D] + ([HH * T * D, HH, O * HH, O] if has_head else [])
    names = ["dlnw", "dlnb", "dw1", "db1", "dw2", "db2"] + (["dhw1", "dhb1", "dhw2", "dhb2"] if has_head else [])
    ptrs = {n + "_ptr": flat[off:] for n, off in zip(names, _offsets(sizes))}
    for n in ["dhw1", "dhb1", "dhw2", "dhb2"]:
        ptrs.setdefault(n + "_ptr", flat)
    args = dict(
        t_ptr=t, out_ptr=out, lnw_ptr=lnw, lnb_ptr=lnb, w1_ptr=w1, b1_ptr=b1, w2_ptr=w2,
        mean_ptr=mean, rstd_ptr=rstd, hw1_ptr=hw1 if has_head else w1, hw2_ptr=hw2 if has_head else w2,
        hpre_ptr=hpre if has_head else mean, dlogits_ptr=dlogits if dlogits is not None else mean,
        gout_ptr=gout if gout is not None else dflat, dflat_ptr=dflat, dhpre_ptr=dhpre, dt_ptr=dt,
        **ptrs, T=T, D=D, F=Fd, HH=HH, O=O,
    )
    bs = blocks(_prec(w1.dtype))
    meta = dict(RESIDUAL=bool(residual), HAS_HEAD=has_head, HAS_GOUT=gout is not None, ACT=int(act),
                BT=bs["T_BWD"], BD=_p2(D), BF=bs["F_BWD"], BH=bs["H"], BK=bs["K_HEAD"], BO=bs["O"],
                PREC=_prec(w1.dtype))
    return Launch("triton_mlp_head_bwd", mlp_head_bwd_kernel, (B,), args, meta)


def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


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
    ctx.save_for_backward(x, w, extra, we)
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
    ctx.save_for_backward(t, lnw, lnb, wq, wk, wv, wo, mean, rstd, q, k, v, o, lse)
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
    ctx.save_for_backward(t, out, lnw, lnb, w1, b1, w2, mean, rstd,
                          *((hw1, hw2, hpre) if ctx.has_head else ()))
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


# ---------------------------------------------------------------------------------------------------
# the whole exit
# ---------------------------------------------------------------------------------------------------

def slvit_exit(x: Tensor, params: dict[str, Tensor], config, extra: Optional[Tensor] = None) -> Tensor:
    """The SL-ViT exit forward on the Triton ops: 1 + 2 * num_layers launches (3 for the paper's exit)."""
    c = config
    p = params
    ph, pw = c.patch_size
    t = torch.ops.slvit_fast.triton_patch_embed(
        x, p["patch_embed.weight"], p["patch_embed.bias"], p["pos_embed"], extra,
        p.get("extra_embed.weight"), p.get("extra_embed.bias"), ph, pw,
    )
    act = ACTIVATIONS[c.activation]
    logits = None
    for i in range(c.num_layers):
        L = f"layers.{i}."
        t = torch.ops.slvit_fast.triton_attention(
            t, p[L + "norm1.weight"], p[L + "norm1.bias"], p[L + "attn.q.weight"], p[L + "attn.q.bias"],
            p[L + "attn.k.weight"], p[L + "attn.k.bias"], p[L + "attn.v.weight"], p[L + "attn.v.bias"],
            p[L + "attn.out.weight"], p[L + "attn.out.bias"], c.num_heads, c.ln_eps,
        )[0]
        last = i == c.num_layers - 1
        head = [p["head.fc1.weight"], p["head.fc1.bias"], p["head.fc2.weight"], p["head.fc2.bias"]] if last \
            else [None] * 4
        logits, t = torch.ops.slvit_fast.triton_mlp_head(
            t, p[L + "norm2.weight"], p[L + "norm2.bias"], p[L + "mlp.fc1.weight"], p[L + "mlp.fc1.bias"],
            p[L + "mlp.fc2.weight"], p[L + "mlp.fc2.bias"], *head, c.ln_eps, c.mlp_residual, act,
        )[:2]
    return logits


__all__ = ["slvit_exit", "Launch", "SUPPORTED_DTYPES"]
