"""Plain-PyTorch SL-ViT exit: the specification every fused kernel is tested against.

Each function is one fused unit of the kernel backends (patch embedding, attention block, MLP block,
flattening head), written for clarity, not speed. Weights use torch's ``nn.Linear`` layout
``(out_features, in_features)``. Everything here runs in any dtype, float64 included, so a test can
compute the "true" answer and measure the rounding error of the reference itself in half precision.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # import only for type names: modules import this file, never the reverse
    from .config import SLViTConfig


def extract_patches(x: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, N, ph*pw*C), patches row-major over the grid, each flattened (ph, pw, C).

    The (ph, pw, C) order is Keras' ``tf.image.extract_patches`` order, so weights imported from the
    paper's Keras models need no permutation.
    """
    B, C, H, W = x.shape
    ph, pw = patch_size
    gh, gw = H // ph, W // pw
    x = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, gh * gw, ph * pw * C)


def patch_embed(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    pos: Tensor,
    patch_size: tuple[int, int],
    extra: Tensor | None = None,
    extra_weight: Tensor | None = None,
    extra_bias: Tensor | None = None,
) -> Tensor:
    """Patch extraction + linear embedding + position embedding; extra tokens appended after the patches.

    x: (B, C, H, W); weight: (d, ph*pw*C); bias: (d,); pos: (N, d).
    extra: (B, E, d_in) projected by extra_weight (d, d_in) + extra_bias; extra tokens carry no
    position embedding (their projection bias plays that role).
    """
    tokens = F.linear(extract_patches(x, patch_size), weight, bias) + pos
    if extra is not None:
        tokens = torch.cat([tokens, F.linear(extra, extra_weight, extra_bias)], dim=1)
    return tokens


def attention_block(
    t: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    wq: Tensor,
    bq: Tensor,
    wk: Tensor,
    bk: Tensor,
    wv: Tensor,
    bv: Tensor,
    wo: Tensor,
    bo: Tensor,
    num_heads: int,
    eps: float,
    attention_dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``t + MHA(LN(t))`` with Keras semantics: each of ``num_heads`` heads is ``key_dim`` wide.

    t: (B, T, d); wq/wk/wv: (h*key_dim, d); wo: (d, h*key_dim).
    """
    B, T, d = t.shape
    key_dim = wq.shape[0] // num_heads
    y = F.layer_norm(t, (d,), ln_weight, ln_bias, eps)

    def heads(w: Tensor, b: Tensor) -> Tensor:
        return F.linear(y, w, b).reshape(B, T, num_heads, key_dim).transpose(1, 2)  # (B, h, T, kd)

    q, k, v = heads(wq, bq), heads(wk, bk), heads(wv, bv)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(key_dim))
    probs = torch.softmax(scores, dim=-1)
    if attention_dropout > 0 and training:
        probs = F.dropout(probs, attention_dropout, training=True)
    o = (probs @ v).transpose(1, 2).reshape(B, T, num_heads * key_dim)
    return t + F.linear(o, wo, bo)


def mlp_block(
    t: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    eps: float,
    residual: bool = True,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``t + W2 GELU(W1 LN(t))`` (exact erf GELU, as Keras' default); ``residual=False`` drops the ``t +``."""
    d = t.shape[-1]
    h = F.gelu(F.linear(F.layer_norm(t, (d,), ln_weight, ln_bias, eps), w1, b1))
    if dropout > 0 and training:
        h = F.dropout(h, dropout, training=True)
    m = F.linear(h, w2, b2)
    if dropout > 0 and training:
        m = F.dropout(m, dropout, training=True)
    return t + m if residual else m


def activation_fn(name: str, x: Tensor) -> Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {name!r}; expected 'gelu' or 'relu'")


def mlp_head(
    flat: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    activation: str = "gelu",
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Linear -> activation -> Dropout -> Linear: the head shared by the SL-ViT and CNN exits."""
    h = activation_fn(activation, F.linear(flat, w1, b1))
    if dropout > 0 and training:
        h = F.dropout(h, dropout, training=True)
    return F.linear(h, w2, b2)


def flatten_head(
    t: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    activation: str = "gelu",
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Flatten all (B, T, d) tokens token-major to (B, T*d), then the MLP head."""
    return mlp_head(t.reshape(t.shape[0], -1), w1, b1, w2, b2, activation, dropout, training)


def slvit_exit(
    x: Tensor,
    params: dict[str, Tensor],
    config: "SLViTConfig",
    extra: Tensor | None = None,
    training: bool = False,
) -> Tensor:
    """The whole SL-ViT exit, (B, C, H, W) -> (B, num_outputs), from a dict of named parameters.

    ``params`` uses the parameter names of :class:`slvit_fast.SLViTExit` (its ``named_parameters()``).
    """
    c = config
    p = params
    t = patch_embed(
        x, p["patch_embed.weight"], p["patch_embed.bias"], p["pos_embed"], c.patch_size,
        extra, p.get("extra_embed.weight"), p.get("extra_embed.bias"),
    )
    if c.dropout > 0 and training:
        t = F.dropout(t, c.dropout, training=True)
    for i in range(c.num_layers):
        L = f"layers.{i}."
        t = attention_block(
            t, p[L + "norm1.weight"], p[L + "norm1.bias"],
            p[L + "attn.q.weight"], p[L + "attn.q.bias"], p[L + "attn.k.weight"], p[L + "attn.k.bias"],
            p[L + "attn.v.weight"], p[L + "attn.v.bias"], p[L + "attn.out.weight"], p[L + "attn.out.bias"],
            c.num_heads, c.ln_eps, c.attention_dropout, training,
        )
        t = mlp_block(
            t, p[L + "norm2.weight"], p[L + "norm2.bias"],
            p[L + "mlp.fc1.weight"], p[L + "mlp.fc1.bias"], p[L + "mlp.fc2.weight"], p[L + "mlp.fc2.bias"],
            c.ln_eps, c.mlp_residual, c.dropout, training,
        )
    return flatten_head(
        t, p["head.fc1.weight"], p["head.fc1.bias"], p["head.fc2.weight"], p["head.fc2.bias"],
        c.activation, c.head_dropout, training,
    )
