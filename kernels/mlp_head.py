"""Fused MLP block ``t + W2 GELU(W1 LN(t))`` (residual optional) and flattening MLP head.

One program per sample: the MLP runs block by block over the tokens with the hidden layer streamed in
BF-wide chunks (never materialised), writes the block output (B, T, D) fp32, and - when HAS_HEAD - reads
the sample's flattened tokens back (after a CTA barrier) for ``logits = W2h act(W1h flat + b1h) + b2h``.
The pre-activation of the head's hidden layer is kept for the backward pass.
"""

import triton
import triton.language as tl

from .common import activation, activation_grad, gelu, gelu_grad, layer_norm_rows


@triton.jit
def mlp_head_fwd_kernel(
    t_ptr, out_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, mean_ptr, rstd_ptr,
    hw1_ptr, hb1_ptr, hw2_ptr, hb2_ptr, hpre_ptr, logits_ptr,
    T, D, F, HH, O, eps,
    RESIDUAL: tl.constexpr, HAS_HEAD: tl.constexpr, ACT: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    BH: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_f = tl.arange(0, BF)
    dmask = offs_d < D
    lnw = tl.load(lnw_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    b2 = tl.load(b2_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    for t0 in range(0, T, BT):
        rows = t0 + offs_t
        rmask = rows < T
        m2 = rmask[:, None] & dmask[None, :]
        x = tl.load(t_ptr + b * T * D + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        y, xhat, mean, rstd = layer_norm_rows(x, m2, lnw, lnb, D, eps)
        tl.store(mean_ptr + b * T + rows, mean, mask=rmask)
        tl.store(rstd_ptr + b * T + rows, rstd, mask=rmask)
        if RESIDUAL:
            acc = x + b2[None, :]
        else:
            acc = tl.zeros((BT, BD), dtype=tl.float32) + b2[None, :]
        for f0 in range(0, F, BF):
            ff = f0 + offs_f
            fmask = ff < F
            w1 = tl.load(w1_ptr + ff[:, None] * D + offs_d[None, :], mask=fmask[:, None] & dmask[None, :],
                         other=0.0).to(tl.float32)  # (BF, BD)
            b1 = tl.load(b1_ptr + ff, mask=fmask, other=0.0).to(tl.float32)
            z = tl.dot(y, tl.trans(w1), input_precision=PREC) + b1[None, :]
            w2 = tl.load(w2_ptr + offs_d[:, None] * F + ff[None, :], mask=dmask[:, None] & fmask[None, :],
                         other=0.0).to(tl.float32)  # (BD, BF)
            acc += tl.dot(gelu(z), tl.trans(w2), input_precision=PREC)
        tl.store(out_ptr + b * T * D + rows[:, None] * D + offs_d[None, :], acc, mask=m2)
    if HAS_HEAD:
        tl.debug_barrier()  # the head reads every token of this sample, written by other threads
        K = T * D
        offs_h = tl.arange(0, BH)
        offs_k = tl.arange(0, BK)
        for h0 in range(0, HH, BH):
            hh = h0 + offs_h
            hmask = hh < HH
            hacc = tl.zeros((BH,), dtype=tl.float32)
            for k0 in range(0, K, BK):
                kk = k0 + offs_k
                kmask = kk < K
                f = tl.load(out_ptr + b * K + kk, mask=kmask, other=0.0)
                w = tl.load(hw1_ptr + hh[:, None] * K + kk[None, :], mask=hmask[:, None] & kmask[None, :],
                            other=0.0).to(tl.float32)
                hacc += tl.sum(w * f[None, :], 1)
            hacc += tl.load(hb1_ptr + hh, mask=hmask, other=0.0).to(tl.float32)
            tl.store(hpre_ptr + b * HH + hh, hacc, mask=hmask)
        tl.debug_barrier()
        offs_o = tl.arange(0, BO)
        for o0 in range(0, O, BO):
            oo = o0 + offs_o
            omask = oo < O
            lacc = tl.zeros((BO,), dtype=tl.float32)
            for h0 in range(0, HH, BH):
                hh = h0 + offs_h
                hmask = hh < HH
                a = activation(tl.load(hpre_ptr + b * HH + hh, mask=hmask, other=0.0), ACT)
                w = tl.load(hw2_ptr + oo[:, None] * HH + hh[None, :], mask=omask[:, None] & hmask[None, :],
                            other=0.0).to(tl.float32)
                lacc += tl.sum(w * a[None, :], 1)
            lacc += tl.load(hb2_ptr + oo, mask=omask, other=0.0).to(tl.float32)
            tl.store(logits_ptr + b * O + oo, lacc.to(logits_ptr.dtype.element_ty), mask=omask)


@triton.jit
def mlp_head_bwd_kernel(
    t_ptr, out_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, mean_ptr, rstd_ptr,
    hw1_ptr, hw2_ptr, hpre_ptr, dlogits_ptr, gout_ptr, dflat_ptr, dhpre_ptr, dt_ptr,
    dlnw_ptr, dlnb_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, dhw1_ptr, dhb1_ptr, dhw2_ptr, dhb2_ptr,
    T, D, F, HH, O,
    RESIDUAL: tl.constexpr, HAS_HEAD: tl.constexpr, HAS_GOUT: tl.constexpr, ACT: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    BH: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, PREC: tl.constexpr,
):
    """One program per sample. Upstream gradients: ``dlogits`` (B, O) when HAS_HEAD and/or ``gout`` =
    dL/d(block output) (B, T, D) when HAS_GOUT. Their sum dL/d(out) goes to scratch ``dflat`` (B, T*D);
    ``dt`` = dL/d(block input). Weight gradients: fp32 atomics into zero-initialised buffers."""
    b = tl.program_id(0).to(tl.int64)
    K = T * D
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_f = tl.arange(0, BF)
    dmask = offs_d < D
    if HAS_HEAD:
        offs_h = tl.arange(0, BH)
        offs_k = tl.arange(0, BK)
        offs_o = tl.arange(0, BO)
        for h0 in range(0, HH, BH):
            hh = h0 + offs_h
            hmask = hh < HH
            hp = tl.load(hpre_ptr + b * HH + hh, mask=hmask, other=0.0)
            a = activation(hp, ACT)
            da = tl.zeros((BH,), dtype=tl.float32)
            for o0 in range(0, O, BO):
                oo = o0 + offs_o
                omask = oo < O
                dl = tl.load(dlogits_ptr + b * O + oo, mask=omask, other=0.0).to(tl.float32)
                m2 = omask[:, None] & hmask[None, :]
                w = tl.load(hw2_ptr + oo[:, None] * HH + hh[None, :], mask=m2, other=0.0).to(tl.float32)
                da += tl.sum(w * dl[:, None], 0)
                tl.atomic_add(dhw2_ptr + oo[:, None] * HH + hh[None, :], dl[:, None] * a[None, :], mask=m2,
                              sem="relaxed")
                if h0 == 0:
                    tl.atomic_add(dhb2_ptr + oo, dl, mask=omask, sem="relaxed")
            dh = tl.where(hmask, da * activation_grad(hp, ACT), 0.0)
            tl.store(dhpre_ptr + b * HH + hh, dh, mask=hmask)
            tl.atomic_add(dhb1_ptr + hh, dh, mask=hmask, sem="relaxed")
        tl.debug_barrier()
        for k0 in range(0, K, BK):
            kk = k0 + offs_k
            kmask = kk < K
            f = tl.load(out_ptr + b * K + kk, mask=kmask, other=0.0)
            if HAS_GOUT:
                df = tl.load(gout_ptr + b * K + kk, mask=kmask, other=0.0)
            else:
                df = tl.zeros((BK,), dtype=tl.float32)
            for h0 in range(0, HH, BH):
                hh = h0 + offs_h
                hmask = hh < HH
                dh = tl.load(dhpre_ptr + b * HH + hh, mask=hmask, other=0.0)
                m2 = hmask[:, None] & kmask[None, :]
                w = tl.load(hw1_ptr + hh[:, None] * K + kk[None, :], mask=m2, other=0.0).to(tl.float32)
                df += tl.sum(w * dh[:, None], 0)
                tl.atomic_add(dhw1_ptr + hh[:, None] * K + kk[None, :], dh[:, None] * f[None, :], mask=m2,
                              sem="relaxed")
            tl.store(dflat_ptr + b * K + kk, df, mask=kmask)
        tl.debug_barrier()
        g_ptr = dflat_ptr
    else:
        g_ptr = gout_ptr
    lnw = tl.load(lnw_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    dlnw = tl.zeros((BD,), dtype=tl.float32)
    dlnb = tl.zeros((BD,), dtype=tl.float32)
    db2 = tl.zeros((BD,), dtype=tl.float32)
    for t0 in range(0, T, BT):
        rows = t0 + offs_t
        rmask = rows < T
        m2 = rmask[:, None] & dmask[None, :]
        x = tl.load(t_ptr + b * T * D + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        mean = tl.load(mean_ptr + b * T + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * T + rows, mask=rmask, other=0.0)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
        y = tl.where(m2, xhat * lnw[None, :] + lnb[None, :], 0.0)
        g = tl.load(g_ptr + b * K + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        gT = tl.load(g_ptr + b * K + rows[None, :] * D + offs_d[:, None], mask=rmask[None, :] & dmask[:, None],
                     other=0.0)  # loaded transposed: transposing computed tiles costs registers
        db2 += tl.sum(g, 0)
        dy = tl.zeros((BT, BD), dtype=tl.float32)
        for f0 in range(0, F, BF):
            ff = f0 + offs_f
            fmask = ff < F
            w1m = fmask[:, None] & dmask[None, :]
            w2m = dmask[:, None] & fmask[None, :]
            w1 = tl.load(w1_ptr + ff[:, None] * D + offs_d[None, :], mask=w1m, other=0.0).to(tl.float32)
            b1 = tl.load(b1_ptr + ff, mask=fmask, other=0.0).to(tl.float32)
            z = tl.dot(y, tl.trans(w1), input_precision=PREC) + b1[None, :]
            w2 = tl.load(w2_ptr + offs_d[:, None] * F + ff[None, :], mask=w2m, other=0.0).to(tl.float32)
            tl.atomic_add(dw2_ptr + offs_d[:, None] * F + ff[None, :],
                          tl.dot(gT, gelu(z), input_precision=PREC), mask=w2m, sem="relaxed")
            dz = tl.dot(g, w2, input_precision=PREC) * gelu_grad(z)
            tl.atomic_add(dw1_ptr + ff[:, None] * D + offs_d[None, :],
                          tl.dot(tl.trans(dz), y, input_precision=PREC), mask=w1m, sem="relaxed")
            tl.atomic_add(db1_ptr + ff, tl.sum(dz, 0), mask=fmask, sem="relaxed")
            dy += tl.dot(dz, w1, input_precision=PREC)
        dlnw += tl.sum(dy * xhat, 0)
        dlnb += tl.sum(tl.where(m2, dy, 0.0), 0)
        wdy = tl.where(m2, dy * lnw[None, :], 0.0)
        c1 = tl.sum(xhat * wdy, 1) / D
        c2 = tl.sum(wdy, 1) / D
        dx = tl.where(m2, (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None], 0.0)
        if RESIDUAL:
            dx += g
        tl.store(dt_ptr + b * T * D + rows[:, None] * D + offs_d[None, :], dx, mask=m2)
    tl.atomic_add(dlnw_ptr + offs_d, dlnw, mask=dmask, sem="relaxed")
    tl.atomic_add(dlnb_ptr + offs_d, dlnb, mask=dmask, sem="relaxed")
    tl.atomic_add(db2_ptr + offs_d, db2, mask=dmask, sem="relaxed")
