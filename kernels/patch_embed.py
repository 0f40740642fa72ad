"""Patch extraction + patch embedding as one implicit GEMM, forward and backward.

Token ``n`` of sample ``b`` is ``x[b, :, gy*PH:(gy+1)*PH, gx*PW:(gx+1)*PW]`` flattened in (ph, pw, C)
order (``k = (i*PW + j)*C + c``), read straight from the feature map through its strides: NCHW and
channels_last work alike and nothing is unfolded in memory. Bias and position embedding are added in
the epilogue; extra (audio) tokens ``extra[b] @ We^T + be`` are appended after the N patch tokens.
Output tokens are float32 (B, T, D) whatever the input dtype: the fused exit keeps activations in fp32.
"""

import triton
import triton.language as tl


@triton.jit
def patch_embed_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, pos_ptr, extra_ptr, we_ptr, be_ptr, out_ptr,
    sb, sc, sh, sw,
    C, GW, N, T, D, K, E, DE, PH, PW,
    HAS_EXTRA: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
    PREC: tl.constexpr,
):
    """Grid (B, cdiv(N, BT)). The reduction over k = (i*PW + j)*C + c runs as loops over the patch
    position (i, j) and BC-wide channel chunks: a channel chunk of one pixel is a strided row of x
    (contiguous for channels_last), and no per-element index division is needed."""
    b = tl.program_id(0).to(tl.int64)
    pn = tl.program_id(1)
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_c = tl.arange(0, BC)
    dmask = offs_d < D
    rows = pn * BT + offs_t
    rmask = rows < N
    gy = rows // GW
    gx = rows % GW
    x_tile = x_ptr + b * sb + (gy * PH * sh + gx * PW * sw)[:, None] + (offs_c * sc)[None, :]
    w_tile = w_ptr + offs_d[None, :] * K + offs_c[:, None]
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for c0 in range(0, C, BC):
        cmask = (c0 + offs_c) < C
        xm = rmask[:, None] & cmask[None, :]
        wm = cmask[:, None] & dmask[None, :]
        for i in range(0, PH):
            for j in range(0, PW):
                xt = tl.load(x_tile + (c0 * sc + i * sh + j * sw), mask=xm, other=0.0)
                wt = tl.load(w_tile + ((i * PW + j) * C + c0), mask=wm, other=0.0)
                acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision=PREC)
    m2 = rmask[:, None] & dmask[None, :]
    bias = tl.load(bias_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    acc += bias[None, :] + pos
    tl.store(out_ptr + b * T * D + rows[:, None] * D + offs_d[None, :], acc, mask=m2)
    if HAS_EXTRA:
        if pn == 0:
            offs_k = tl.arange(0, BK)
            offs_e = tl.arange(0, BE)
            emask = offs_e < E
            eacc = tl.zeros((BE, BD), dtype=tl.float32)
            for k0 in range(0, DE, BK):
                kk = k0 + offs_k
                kmask = kk < DE
                xe = tl.load(extra_ptr + b * E * DE + offs_e[:, None] * DE + kk[None, :],
                             mask=emask[:, None] & kmask[None, :], other=0.0)
                we = tl.load(we_ptr + offs_d[None, :] * DE + kk[:, None], mask=kmask[:, None] & dmask[None, :],
                             other=0.0)
                eacc += tl.dot(xe.to(tl.float32), we.to(tl.float32), input_precision=PREC)
            be = tl.load(be_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
            eacc += be[None, :]
            tl.store(out_ptr + b * T * D + (N + offs_e[:, None]) * D + offs_d[None, :], eacc,
                     mask=emask[:, None] & dmask[None, :])


@triton.jit
def patch_embed_bwd_kernel(
    x_ptr, w_ptr, extra_ptr, we_ptr, g_ptr,
    dx_ptr, dw_ptr, dbias_ptr, dpos_ptr, dextra_ptr, dwe_ptr, dbe_ptr,
    sb, sc, sh, sw, dsb, dsc, dsh, dsw,
    B, C, GW, N, T, D, K, E, DE, PH, PW,
    HAS_EXTRA: tl.constexpr,
    BR: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Grid: one program per (patch position (i, j), BC-wide channel chunk) - i.e. per column block of
    the patch matrix: its dW block and dx for those columns over all B*N rows, no atomics -, then one
    program for d(bias), d(pos), then (HAS_EXTRA) one for the extra-token projection's gradients.
    ``g`` is dL/dtokens, fp32 (B, T, D)."""
    pid = tl.program_id(0)
    ncb = tl.cdiv(C, BC)
    nkb = PH * PW * ncb
    offs_r = tl.arange(0, BR)
    offs_d = tl.arange(0, BD)
    offs_c = tl.arange(0, BC)
    dmask = offs_d < D
    if pid < nkb:
        pij = pid // ncb
        c0 = (pid % ncb) * BC
        i = pij // PW
        j = pij % PW
        cc = c0 + offs_c
        cmask = cc < C
        kk = pij * C + cc
        wt = tl.load(w_ptr + offs_d[None, :] * K + kk[:, None], mask=cmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)  # (BC, BD) = W^T tile
        x_col = (cc * sc + i * sh + j * sw)[None, :]
        dx_col = (cc * dsc + i * dsh + j * dsw)[None, :]
        dwt = tl.zeros((BC, BD), dtype=tl.float32)
        for r0 in range(0, B * N, BR):
            r = r0 + offs_r
            rmask = r < B * N
            bb = (r // N).to(tl.int64)
            n = r % N
            gy = n // GW
            gx = n % GW
            g = tl.load(g_ptr + bb[:, None] * T * D + n[:, None] * D + offs_d[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            m2 = rmask[:, None] & cmask[None, :]
            p = tl.load(x_ptr + (bb * sb + gy * PH * sh + gx * PW * sw)[:, None] + x_col, mask=m2,
                        other=0.0).to(tl.float32)
            dwt += tl.dot(tl.trans(p), g, input_precision=PREC)
            dxt = tl.dot(g, tl.trans(wt), input_precision=PREC)
            tl.store(dx_ptr + (bb * dsb + gy * PH * dsh + gx * PW * dsw)[:, None] + dx_col,
                     dxt.to(dx_ptr.dtype.element_ty), mask=m2)
        tl.store(dw_ptr + offs_d[None, :] * K + kk[:, None], dwt, mask=cmask[:, None] & dmask[None, :])
    elif pid == nkb:
        dbias = tl.zeros((BD,), dtype=tl.float32)
        for n0 in range(0, N, BR):
            rows = n0 + offs_r
            m2 = (rows < N)[:, None] & dmask[None, :]
            acc = tl.zeros((BR, BD), dtype=tl.float32)
            for bb in range(0, B):
                acc += tl.load(g_ptr + bb * T * D + rows[:, None] * D + offs_d[None, :], mask=m2,
                               other=0.0)
            tl.store(dpos_ptr + rows[:, None] * D + offs_d[None, :], acc, mask=m2)
            dbias += tl.sum(acc, 0)
        tl.store(dbias_ptr + offs_d, dbias, mask=dmask)
    else:
        if HAS_EXTRA:
            offs_k = tl.arange(0, BK)
            dbe = tl.zeros((BD,), dtype=tl.float32)
            for k0 in range(0, DE, BK):
                kk = k0 + offs_k
                kmask = kk < DE
                wet = tl.load(we_ptr + offs_d[None, :] * DE + kk[:, None], mask=kmask[:, None] & dmask[None, :],
                              other=0.0).to(tl.float32)  # (BK, BD)
                dwet = tl.zeros((BK, BD), dtype=tl.float32)
                for r0 in range(0, B * E, BR):
                    r = r0 + offs_r
                    rmask = r < B * E
                    bb = (r // E).to(tl.int64)
                    e = r % E
                    g = tl.load(g_ptr + bb[:, None] * T * D + (N + e[:, None]) * D + offs_d[None, :],
                                mask=rmask[:, None] & dmask[None, :], other=0.0)
                    m2 = rmask[:, None] & kmask[None, :]
                    xoff = bb[:, None] * E * DE + e[:, None] * DE + kk[None, :]
                    xe = tl.load(extra_ptr + xoff, mask=m2, other=0.0).to(tl.float32)
                    dwet += tl.dot(tl.trans(xe), g, input_precision=PREC)
                    dxe = tl.dot(g, tl.trans(wet), input_precision=PREC)
                    tl.store(dextra_ptr + xoff, dxe.to(dextra_ptr.dtype.element_ty), mask=m2)
                    if k0 == 0:
                        dbe += tl.sum(g, 0)
                tl.store(dwe_ptr + offs_d[None, :] * DE + kk[:, None], dwet, mask=kmask[:, None] & dmask[None, :])
            tl.store(dbe_ptr + offs_d, dbe, mask=dmask)
