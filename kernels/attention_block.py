"""Fused pre-norm attention block ``t + MHA(LN(t))`` with Keras semantics, forward and backward.

One program per sample holds the whole sample: phase 1 computes LayerNorm and the per-head Q/K/V
projections (h heads x key_dim) into a per-sample scratch buffer; phase 2 runs softmax(QK^T/sqrt(kd))V
over all T tokens for every (query block, head) - exact softmax over the full row, computed block by
block with a running max (the row is at most 160 keys) - and accumulates the output projection and
residual in registers. Layouts: t (B, T, D) fp32; q/k/v scratch (B, H, T, KD) fp32; o (B, T, H*KD);
lse (B, H, T). Weights in torch Linear layout (out, in), contiguous.
"""

import triton
import triton.language as tl

from .common import layer_norm_rows, layer_norm_rows_bwd


@triton.jit
def attention_fwd_kernel(
    t_ptr, out_ptr, lnw_ptr, lnb_ptr,
    wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, wo_ptr, bo_ptr,
    mean_ptr, rstd_ptr, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    T, D, KD, H, eps, scale,
    BT: tl.constexpr, BD: tl.constexpr, BKD: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    A = H * KD
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_k = tl.arange(0, BKD)
    dmask = offs_d < D
    kmask = offs_k < KD
    wmask = kmask[:, None] & dmask[None, :]
    lnw = tl.load(lnw_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    t_base = t_ptr + b * T * D
    qkv_base = b * H * T * KD
    # phase 1: LayerNorm + Q/K/V projections of every token, every head
    for t0 in range(0, T, BT):
        rows = t0 + offs_t
        rmask = rows < T
        m2 = rmask[:, None] & dmask[None, :]
        x = tl.load(t_base + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        y, xhat, mean, rstd = layer_norm_rows(x, m2, lnw, lnb, D, eps)
        tl.store(mean_ptr + b * T + rows, mean, mask=rmask)
        tl.store(rstd_ptr + b * T + rows, rstd, mask=rmask)
        sm = rmask[:, None] & kmask[None, :]
        for h in range(0, H):
            woff = (h * KD + offs_k)[:, None] * D + offs_d[None, :]
            soff = qkv_base + h * T * KD + rows[:, None] * KD + offs_k[None, :]
            w = tl.load(wq_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
            bias = tl.load(bq_ptr + h * KD + offs_k, mask=kmask, other=0.0).to(tl.float32)
            tl.store(q_ptr + soff, tl.dot(y, tl.trans(w), input_precision=PREC) + bias[None, :], mask=sm)
            w = tl.load(wk_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
            bias = tl.load(bk_ptr + h * KD + offs_k, mask=kmask, other=0.0).to(tl.float32)
            tl.store(k_ptr + soff, tl.dot(y, tl.trans(w), input_precision=PREC) + bias[None, :], mask=sm)
            w = tl.load(wv_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
            bias = tl.load(bv_ptr + h * KD + offs_k, mask=kmask, other=0.0).to(tl.float32)
            tl.store(v_ptr + soff, tl.dot(y, tl.trans(w), input_precision=PREC) + bias[None, :], mask=sm)
    tl.debug_barrier()  # phase 2 reads K/V rows written by other threads of this program
    bo = tl.load(bo_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    for t0 in range(0, T, BT):
        rows = t0 + offs_t
        rmask = rows < T
        m2 = rmask[:, None] & dmask[None, :]
        sm = rmask[:, None] & kmask[None, :]
        acc = tl.load(t_base + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0) + bo[None, :]
        for h in range(0, H):
            hbase = qkv_base + h * T * KD
            q = tl.load(q_ptr + hbase + rows[:, None] * KD + offs_k[None, :], mask=sm, other=0.0)
            m_i = tl.full((BT,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BT,), dtype=tl.float32)
            o = tl.zeros((BT, BKD), dtype=tl.float32)
            for s0 in range(0, T, BT):
                cols = s0 + offs_t
                cmask = cols < T
                cm = cmask[:, None] & kmask[None, :]
                kt = tl.load(k_ptr + hbase + cols[:, None] * KD + offs_k[None, :], mask=cm, other=0.0)
                vt = tl.load(v_ptr + hbase + cols[:, None] * KD + offs_k[None, :], mask=cm, other=0.0)
                s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
                s = tl.where(cmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1), propagate_nan=tl.PropagateNan.ALL)
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                o = o * alpha[:, None] + tl.dot(p, vt, input_precision=PREC)
                m_i = m_new
            o = o / l_i[:, None]
            tl.store(lse_ptr + (b * H + h) * T + rows, m_i + tl.log(l_i), mask=rmask)
            tl.store(o_ptr + b * T * A + rows[:, None] * A + h * KD + offs_k[None, :], o, mask=sm)
            wo = tl.load(wo_ptr + offs_d[:, None] * A + h * KD + offs_k[None, :],
                         mask=dmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)  # (BD, BKD)
            acc += tl.dot(o, tl.trans(wo), input_precision=PREC)
        tl.store(out_ptr + b * T * D + rows[:, None] * D + offs_d[None, :], acc, mask=m2)


@triton.jit
def attention_bwd_kernel(
    t_ptr, g_ptr, dt_ptr, lnw_ptr, lnb_ptr,
    wq_ptr, wk_ptr, wv_ptr, wo_ptr,
    mean_ptr, rstd_ptr, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    do_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    dlnw_ptr, dlnb_ptr, dwq_ptr, dbq_ptr, dwk_ptr, dbk_ptr, dwv_ptr, dbv_ptr, dwo_ptr, dbo_ptr,
    T, D, KD, H, scale,
    BT: tl.constexpr, BD: tl.constexpr, BKD: tl.constexpr, PREC: tl.constexpr,
):
    """One program per sample. ``g`` = dL/d(block output) (B, T, D); writes ``dt`` = dL/d(block input).
    Weight gradients are accumulated over samples with fp32 atomics into zero-initialised buffers.
    Scratch: do/dq/dk/dv (B, H, T, KD), delta (B, H, T)."""
    b = tl.program_id(0).to(tl.int64)
    A = H * KD
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_k = tl.arange(0, BKD)
    dmask = offs_d < D
    kmask = offs_k < KD
    wmask = kmask[:, None] & dmask[None, :]
    wot_mask = dmask[:, None] & kmask[None, :]
    base = b * H * T * KD
    # phase 0: dO = g Wo_h, dbo, delta = rowsum(dO * O); then dWo = g^T O in a separate pass (fused, the
    # (BD, BKD) dWo tile and the dO tile together spill registers when compiled with 3xTF32 dots)
    dbo = tl.zeros((BD,), dtype=tl.float32)
    for t0 in range(0, T, BT):
        rows = t0 + offs_t
        rmask = rows < T
        m2 = rmask[:, None] & dmask[None, :]
        sm = rmask[:, None] & kmask[None, :]
        g = tl.load(g_ptr + b * T * D + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        dbo += tl.sum(g, 0)
        for h in range(0, H):
            wo = tl.load(wo_ptr + offs_d[:, None] * A + h * KD + offs_k[None, :], mask=wot_mask,
                         other=0.0).to(tl.float32)  # (BD, BKD)
            oh = tl.load(o_ptr + b * T * A + rows[:, None] * A + h * KD + offs_k[None, :], mask=sm, other=0.0)
            do = tl.dot(g, wo, input_precision=PREC)
            tl.store(do_ptr + base + h * T * KD + rows[:, None] * KD + offs_k[None, :], do, mask=sm)
            tl.store(delta_ptr + (b * H + h) * T + rows, tl.sum(do * oh, 1), mask=rmask)
    for t0 in range(0, T, BT):
        rows = t0 + offs_t
        rmask = rows < T
        sm = rmask[:, None] & kmask[None, :]
        # transposed tiles are loaded as such: transposing computed tiles costs registers when compiled
        gT = tl.load(g_ptr + b * T * D + rows[None, :] * D + offs_d[:, None], mask=rmask[None, :] & dmask[:, None],
                     other=0.0)
        for h in range(0, H):
            oh = tl.load(o_ptr + b * T * A + rows[:, None] * A + h * KD + offs_k[None, :], mask=sm, other=0.0)
            tl.atomic_add(dwo_ptr + offs_d[:, None] * A + h * KD + offs_k[None, :],
                          tl.dot(gT, oh, input_precision=PREC), mask=wot_mask, sem="relaxed")
    tl.atomic_add(dbo_ptr + offs_d, dbo, mask=dmask, sem="relaxed")
    tl.debug_barrier()
    # phase 1: dK, dV per key block; dQ per query block (softmax recomputed from lse)
    for h in range(0, H):
        hb = base + h * T * KD
        for s0 in range(0, T, BT):
            cols = s0 + offs_t
            cmask = cols < T
            cm = cmask[:, None] & kmask[None, :]
            kt = tl.load(k_ptr + hb + cols[:, None] * KD + offs_k[None, :], mask=cm, other=0.0)
            vt = tl.load(v_ptr + hb + cols[:, None] * KD + offs_k[None, :], mask=cm, other=0.0)
            dk = tl.zeros((BT, BKD), dtype=tl.float32)
            dv = tl.zeros((BT, BKD), dtype=tl.float32)
            for t0 in range(0, T, BT):
                rows = t0 + offs_t
                rmask = rows < T
                sm = rmask[:, None] & kmask[None, :]
                smT = kmask[:, None] & rmask[None, :]
                q = tl.load(q_ptr + hb + rows[:, None] * KD + offs_k[None, :], mask=sm, other=0.0)
                qT = tl.load(q_ptr + hb + rows[None, :] * KD + offs_k[:, None], mask=smT, other=0.0)
                do = tl.load(do_ptr + hb + rows[:, None] * KD + offs_k[None, :], mask=sm, other=0.0)
                doT = tl.load(do_ptr + hb + rows[None, :] * KD + offs_k[:, None], mask=smT, other=0.0)
                lse = tl.load(lse_ptr + (b * H + h) * T + rows, mask=rmask, other=0.0)
                delta = tl.load(delta_ptr + (b * H + h) * T + rows, mask=rmask, other=0.0)
                sT = tl.dot(kt, qT, input_precision=PREC) * scale  # (keys, queries)
                pT = tl.where(cmask[:, None] & rmask[None, :], tl.exp(sT - lse[None, :]), 0.0)
                dv += tl.dot(pT, do, input_precision=PREC)
                dpT = tl.dot(vt, doT, input_precision=PREC)
                dsT = pT * (dpT - delta[None, :])
                dk += tl.dot(dsT, q, input_precision=PREC)
            tl.store(dk_ptr + hb + cols[:, None] * KD + offs_k[None, :], dk * scale, mask=cm)
            tl.store(dv_ptr + hb + cols[:, None] * KD + offs_k[None, :], dv, mask=cm)
        for t0 in range(0, T, BT):
            rows = t0 + offs_t
            rmask = rows < T
            sm = rmask[:, None] & kmask[None, :]
            q = tl.load(q_ptr + hb + rows[:, None] * KD + offs_k[None, :], mask=sm, other=0.0)
            do = tl.load(do_ptr + hb + rows[:, None] * KD + offs_k[None, :], mask=sm, other=0.0)
            lse = tl.load(lse_ptr + (b * H + h) * T + rows, mask=rmask, other=0.0)
            delta = tl.load(delta_ptr + (b * H + h) * T + rows, mask=rmask, other=0.0)
            dq = tl.zeros((BT, BKD), dtype=tl.float32)
            for s0 in range(0, T, BT):
                cols = s0 + offs_t
                cmask = cols < T
                cm = cmask[:, None] & kmask[None, :]
                cmT = kmask[:, None] & cmask[None, :]
                kt = tl.load(k_ptr + hb + cols[:, None] * KD + offs_k[None, :], mask=cm, other=0.0)
                kT = tl.load(k_ptr + hb + cols[None, :] * KD + offs_k[:, None], mask=cmT, other=0.0)
                vT = tl.load(v_ptr + hb + cols[None, :] * KD + offs_k[:, None], mask=cmT, other=0.0)
                s = tl.dot(q, kT, input_precision=PREC) * scale
                p = tl.where(rmask[:, None] & cmask[None, :], tl.exp(s - lse[:, None]), 0.0)
                dp = tl.dot(do, vT, input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds, kt, input_precision=PREC)
            tl.store(dq_ptr + hb + rows[:, None] * KD + offs_k[None, :], dq * scale, mask=sm)
    tl.debug_barrier()
    # phase 2: back through the Q/K/V projections and the LayerNorm; residual. The Q/K/V bias gradients are
    # summed here from the (BT, BKD) tiles (reducing phase 3's transposed tiles spills registers)
    lnw = tl.load(lnw_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    dlnw = tl.zeros((BD,), dtype=tl.float32)
    dlnb = tl.zeros((BD,), dtype=tl.float32)
    for t0 in range(0, T, BT):
        rows = t0 + offs_t
        rmask = rows < T
        m2 = rmask[:, None] & dmask[None, :]
        sm = rmask[:, None] & kmask[None, :]
        x = tl.load(t_ptr + b * T * D + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        mean = tl.load(mean_ptr + b * T + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * T + rows, mask=rmask, other=0.0)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.zeros((BT, BD), dtype=tl.float32)
        for h in range(0, H):
            soff = base + h * T * KD + rows[:, None] * KD + offs_k[None, :]
            woff = (h * KD + offs_k)[:, None] * D + offs_d[None, :]
            dq = tl.load(dq_ptr + soff, mask=sm, other=0.0)
            w = tl.load(wq_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
            dy += tl.dot(dq, w, input_precision=PREC)
            tl.atomic_add(dbq_ptr + h * KD + offs_k, tl.sum(dq, 0), mask=kmask, sem="relaxed")
            dk = tl.load(dk_ptr + soff, mask=sm, other=0.0)
            w = tl.load(wk_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
            dy += tl.dot(dk, w, input_precision=PREC)
            tl.atomic_add(dbk_ptr + h * KD + offs_k, tl.sum(dk, 0), mask=kmask, sem="relaxed")
            dv = tl.load(dv_ptr + soff, mask=sm, other=0.0)
            w = tl.load(wv_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
            dy += tl.dot(dv, w, input_precision=PREC)
            tl.atomic_add(dbv_ptr + h * KD + offs_k, tl.sum(dv, 0), mask=kmask, sem="relaxed")
        dlnw += tl.sum(dy * xhat, 0)
        dlnb += tl.sum(dy, 0)
        dx = layer_norm_rows_bwd(dy, xhat, lnw, rstd, m2, D)
        g = tl.load(g_ptr + b * T * D + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        tl.store(dt_ptr + b * T * D + rows[:, None] * D + offs_d[None, :], g + dx, mask=m2)
    tl.atomic_add(dlnw_ptr + offs_d, dlnw, mask=dmask, sem="relaxed")
    tl.atomic_add(dlnb_ptr + offs_d, dlnb, mask=dmask, sem="relaxed")
    # phase 3: Q/K/V weight gradients (a separate pass: fused with phase 2 it spills registers when compiled)
    for t0 in range(0, T, BT):
        rows = t0 + offs_t
        rmask = rows < T
        m2 = rmask[:, None] & dmask[None, :]
        smT = kmask[:, None] & rmask[None, :]
        x = tl.load(t_ptr + b * T * D + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        mean = tl.load(mean_ptr + b * T + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * T + rows, mask=rmask, other=0.0)
        y = tl.where(m2, (x - mean[:, None]) * rstd[:, None] * lnw[None, :] + lnb[None, :], 0.0)
        for h in range(0, H):
            soffT = base + h * T * KD + rows[None, :] * KD + offs_k[:, None]
            woff = (h * KD + offs_k)[:, None] * D + offs_d[None, :]
            dT = tl.load(dq_ptr + soffT, mask=smT, other=0.0)
            tl.atomic_add(dwq_ptr + woff, tl.dot(dT, y, input_precision=PREC), mask=wmask, sem="relaxed")
            dT = tl.load(dk_ptr + soffT, mask=smT, other=0.0)
            tl.atomic_add(dwk_ptr + woff, tl.dot(dT, y, input_precision=PREC), mask=wmask, sem="relaxed")
            dT = tl.load(dv_ptr + soffT, mask=smT, other=0.0)
            tl.atomic_add(dwv_ptr + woff, tl.dot(dT, y, input_precision=PREC), mask=wmask, sem="relaxed")
