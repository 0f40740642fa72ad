"""Small ``@triton.jit`` helpers shared by the fused SL-ViT kernels (LayerNorm, GELU, activations)."""

import triton
import triton.language as tl


@triton.jit
def layer_norm_rows(x, mask2, w, b, D, eps):
    """LayerNorm of each row of the (rows, BD) tile ``x`` over its first ``D`` columns.

    Returns (y, xhat, mean, rstd); padded columns of ``y``/``xhat`` are 0 (``w``/``b`` loaded as 0).
    """
    mean = tl.sum(x, 1) / D
    xc = tl.where(mask2, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    xhat = xc * rstd[:, None]
    y = xhat * w[None, :] + b[None, :]
    return y, xhat, mean, rstd


@triton.jit
def layer_norm_rows_bwd(dy, xhat, w, rstd, mask2, D):
    """Gradient w.r.t. the LayerNorm input of each row, given dL/dy (rows, BD)."""
    wdy = tl.where(mask2, dy * w[None, :], 0.0)
    c1 = tl.sum(xhat * wdy, 1) / D
    c2 = tl.sum(wdy, 1) / D
    return tl.where(mask2, (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None], 0.0)


@triton.jit
def gelu(z):
    """Exact (erf) GELU, as torch's default and Keras' ``gelu(approximate=False)``."""
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def gelu_grad(z):
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    return cdf + z * pdf


@triton.jit
def activation(z, ACT: tl.constexpr):
    """ACT 0: exact GELU, 1: ReLU."""
    if ACT == 0:
        return gelu(z)
    else:
        return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def activation_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return gelu_grad(z)
    else:
        return tl.where(z > 0.0, 1.0, 0.0)
