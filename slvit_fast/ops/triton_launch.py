"""Launch descriptions of the Triton kernels: block-size and ``tl.dot`` precision tables, :class:`Launch`.

A :class:`Launch` names one kernel launch completely (kernel, grid, arguments, compile-time constants,
warps/stages/registers). The custom ops (:mod:`slvit_fast.ops.triton_ops`) run them; ``slvit-fast
gpu-report`` (:mod:`slvit_fast.gpu_report`) builds the same objects on ``meta`` tensors and compiles
them ahead of time for real GPUs, so what is reported is exactly what runs.

:func:`interpreted` is the one "are the kernels running in the Triton interpreter" check of the package.
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


def blocks(precision: str = "tf32") -> dict[str, int]:
    if interpreted():
        return INTERPRETER_BLOCKS
    return COMPILED_BLOCKS_TF32X3 if precision == "tf32x3" else COMPILED_BLOCKS


ACTIVATIONS = {"gelu": 0, "relu": 1}


def _p2(n: int, lo: int = 16) -> int:
    """Next power of two >= max(n, lo): ``tl.dot`` wants every dimension >= 16 when compiled."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(attention_fwd_kernel, InterpretedFunction)


# Decided once, when the kernels were decorated: TRITON_INTERPRET=1 at that import makes every
# ``@triton.jit`` an interpreter object (CPU tensors, no compilation); setting it later changes nothing.
_INTERPRETED = _is_interpreted()


def interpreted() -> bool:
    """True when the kernels are Triton interpreter objects (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


# fp32 "highest" on a GPU: "tf32x3" (3xTF32 split products on tensor cores, ~fp32 accuracy) rather than
# "ieee" (FMA dots hold whole K-slices of both operands per thread and spill at these tile sizes; see
# ``slvit-fast gpu-report --dtypes float32-ieee``).
FP32_EXACT_GPU_PRECISION = "tf32x3"


def prec(dtype: torch.dtype) -> str:
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
# launch descriptions (shared by slvit_fast.ops.triton_ops and slvit_fast.gpu_report)
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
    bs = blocks(prec(w.dtype))
    meta = dict(HAS_EXTRA=extra is not None, BT=bs["T"], BD=_p2(D), BC=min(bs["C_EMBED"], _p2(C)),
                BK=bs["K_EMBED"], BE=_p2(E), PREC=prec(w.dtype))
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
    bs = blocks(prec(w.dtype))
    bc = min(bs["C_EMBED"], _p2(C))
    meta = dict(HAS_EXTRA=has_extra, BR=bs["T"], BD=_p2(D), BC=bc, BK=bs["K_EMBED"], PREC=prec(w.dtype))
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
    meta = dict(BT=blocks(prec(wq.dtype))['T_ATTN'], BD=_p2(D), BKD=_p2(KD), PREC=prec(wq.dtype))
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
    meta = dict(BT=blocks(prec(wq.dtype))['T_ATTN_BWD'], BD=_p2(D), BKD=_p2(KD), PREC=prec(wq.dtype))
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
    bs = blocks(prec(w1.dtype))
    meta = dict(RESIDUAL=bool(residual), HAS_HEAD=has_head, ACT=int(act), BT=bs["T"], BD=_p2(D), BF=bs["F"],
                BH=bs["H"], BK=bs["K_HEAD"], BO=bs["O"], PREC=prec(w1.dtype))
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
    bs = blocks(prec(w1.dtype))
    meta = dict(RESIDUAL=bool(residual), HAS_HEAD=has_head, HAS_GOUT=gout is not None, ACT=int(act),
                BT=bs["T_BWD"], BD=_p2(D), BF=bs["F_BWD"], BH=bs["H"], BK=bs["K_HEAD"], BO=bs["O"],
                PREC=prec(w1.dtype))
    return Launch("triton_mlp_head_bwd", mlp_head_bwd_kernel, (B,), args, meta)


def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out
