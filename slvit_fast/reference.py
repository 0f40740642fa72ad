"""Plain-PyTorch SL-ViT exit: the specification every fused kernel is tested against.

Each function is one fused unit of the kernel backends (patch embedding, attention block, MLP block,
flattening head), written for clarity, not speed. Weights use torch's ``nn.Linear`` layout
``(out_features, in_features)``. Everything here runs in any dtype, float64 included, so a test can
compute the "true" answer and measure the rounding error of the reference itself in half precision.

The end of the file defines the parameter layout: which exit parameter is which argument of each
unit, and the flat order the fused ops take (one definition for every backend).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

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


# The fused units' head: same arguments as mlp_head, but from the (B, T, d) tokens.
def flatten_head(t: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str = "gelu",
                 dropout: float = 0.0, training: bool = False) -> Tensor:
    """Flatten all (B, T, d) tokens token-major to (B, T*d), then the MLP head."""
    return mlp_head(t.reshape(t.shape[0], -1), w1, b1, w2, b2, activation, dropout, training)


def slvit_exit(
    x: Tensor,
    params: "Mapping[str, Tensor] | Sequence[Tensor]",
    config: "SLViTConfig",
    extra: Tensor | None = None,
    training: bool = False,
) -> Tensor:
    """The whole SL-ViT exit, (B, C, H, W) -> (B, num_outputs).

    ``params``: a dict with the parameter names of :class:`slvit_fast.SLViTExit` (its
    ``named_parameters()``), or the flat list in the fused ops' order (:func:`param_names`).
    """
    c = config
    p = unpack_params(params, c)
    t = patch_embed(x, *p.embed, c.patch_size, extra, *(p.extra or (None, None)))
    if c.dropout > 0 and training:
        t = F.dropout(t, c.dropout, training=True)
    for attn, mlp in zip(p.attention, p.mlp):
        t = attention_block(t, *attn, c.num_heads, c.ln_eps, c.attention_dropout, training)
        t = mlp_block(t, *mlp, c.ln_eps, c.mlp_residual, c.dropout, training)
    return flatten_head(t, *p.head, c.activation, c.head_dropout, training)


# ---------------------------------------------------------------------------------------------------
# Parameter layout: the one definition of which exit parameter is which argument of every op.
#
# Names are SLViTExit's ``named_parameters()`` names; each group's order is the order of the tensor
# arguments of the reference function that uses it (patch_embed, attention_block, mlp_block,
# flatten_head), and ``param_names`` concatenates the groups into the flat list the fused ops take
# (Triton custom ops and the C++/CUDA ops: csrc/ reads params[i] in exactly this order).
# ---------------------------------------------------------------------------------------------------

EMBED_PARAMS = ("patch_embed.weight", "patch_embed.bias", "pos_embed")
EXTRA_PARAMS = ("extra_embed.weight", "extra_embed.bias")
ATTENTION_PARAMS = ("norm1.weight", "norm1.bias", "attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias",
                    "attn.v.weight", "attn.v.bias", "attn.out.weight", "attn.out.bias")
MLP_PARAMS = ("norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
LAYER_PARAMS = ATTENTION_PARAMS + MLP_PARAMS  # per encoder layer, under the prefix ``layers.{i}.``
HEAD_PARAMS = ("head.fc1.weight", "head.fc1.bias", "head.fc2.weight", "head.fc2.bias")


def param_names(config: "SLViTConfig") -> list[str]:
    """The exit's parameter names in the order the fused ops take them."""
    names = list(EMBED_PARAMS) + (list(EXTRA_PARAMS) if config.extra_tokens else [])
    for i in range(config.num_layers):
        names += [f"layers.{i}.{n}" for n in LAYER_PARAMS]
    return names + list(HEAD_PARAMS)


class ExitParams(NamedTuple):
    """The flat parameter list cut into the argument groups of the fused units."""

    embed: tuple[Tensor, ...]  # patch_embed weight, bias, pos
    extra: tuple[Tensor, ...] | None  # extra-token projection weight, bias (None without extra tokens)
    attention: list[tuple[Tensor, ...]]  # per layer: attention_block's 10 tensors
    mlp: list[tuple[Tensor, ...]]  # per layer: mlp_block's 6 tensors
    head: tuple[Tensor, ...]  # flatten_head's 4 tensors


def unpack_params(params: "Mapping[str, Tensor] | Sequence[Tensor]", config: "SLViTConfig") -> ExitParams:
    """Named (dict) or flat (op-order list) parameters -> :class:`ExitParams`."""
    if isinstance(params, Mapping):
        params = [params[n] for n in param_names(config)]
    flat = list(params)
    n_layer, n_attn = len(LAYER_PARAMS), len(ATTENTION_PARAMS)
    expected = len(EMBED_PARAMS) + (len(EXTRA_PARAMS) if config.extra_tokens else 0) \
        + config.num_layers * n_layer + len(HEAD_PARAMS)
    if len(flat) != expected:
        raise ValueError(f"an exit with num_layers={config.num_layers}, extra_tokens={config.extra_tokens} has "
                         f"{expected} parameter tensors, got {len(flat)}")
    embed, pos = tuple(flat[:3]), 3
    extra = None
    if config.extra_tokens:
        extra, pos = tuple(flat[3:5]), 5
    attention, mlp = [], []
    for _ in range(config.num_layers):
        layer = flat[pos:pos + n_layer]
        attention.append(tuple(layer[:n_attn]))
        mlp.append(tuple(layer[n_attn:]))
        pos += n_layer
    return ExitParams(embed, extra, attention, mlp, tuple(flat[pos:]))


def _split_names(names: tuple[str, ...]) -> tuple[tuple[tuple[str, ...], str], ...]:
    return tuple((tuple(n.split(".")[:-1]), n.split(".")[-1]) for n in names)


_EMBED_PATHS, _EXTRA_PATHS = _split_names(EMBED_PARAMS), _split_names(EXTRA_PARAMS)
_LAYER_PATHS, _HEAD_PATHS = _split_names(LAYER_PARAMS), _split_names(HEAD_PARAMS)


def _read(root, paths, out: list) -> None:
    for path, leaf in paths:
        m = root
        for k in path:
            m = m._modules[k]
        out.append(m._parameters[leaf])


def module_params(module) -> list[Tensor]:
    """An :class:`~slvit_fast.SLViTExit`'s parameters in op order (:func:`param_names`).

    Read straight from the ``_parameters`` / ``_modules`` dicts: the same objects attribute access
    returns, looked up afresh on every call (a replaced parameter is always seen), at a fraction of
    nn.Module.__getattr__'s cost - which at batch 1 was a sizeable share of a whole fused exit call.
    """
    out: list[Tensor] = []
    _read(module, _EMBED_PATHS, out)
    if module.config.extra_tokens:
        _read(module, _EXTRA_PATHS, out)
    for layer in module._modules["layers"]._modules.values():
        _read(layer, _LAYER_PATHS, out)
    _read(module, _HEAD_PATHS, out)
    return out
