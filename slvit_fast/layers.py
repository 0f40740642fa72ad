"""Small building blocks shared by the exits. Parameter names here are the names the backends read."""

from __future__ import annotations

from torch import Tensor, nn

from . import reference


class MLPHead(nn.Module):
    """Linear -> activation -> Dropout -> Linear (the paper's exit head, same for SL-ViT and CNN exits)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, activation: str, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)
        self.activation = activation
        self.dropout = dropout

    def forward(self, flat: Tensor) -> Tensor:
        return reference.mlp_head(
            flat, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            self.activation, self.dropout, self.training,
        )


class KerasStyleAttention(nn.Module):
    """Parameters of Keras-semantics multi-head attention: h heads each key_dim wide.

    ``torch.nn.MultiheadAttention`` ties the head width to embed_dim / h, which cannot express the
    paper's d=32, h=12, key_dim=32 (384-wide Q/K/V), hence separate projections.
    """

    def __init__(self, embed_dim: int, num_heads: int, key_dim: int):
        super().__init__()
        width = num_heads * key_dim
        self.q = nn.Linear(embed_dim, width)
        self.k = nn.Linear(embed_dim, width)
        self.v = nn.Linear(embed_dim, width)
        self.out = nn.Linear(width, embed_dim)


class EncoderMLP(nn.Module):
    def __init__(self, embed_dim: int, mlp_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, embed_dim)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer parameters; the math lives in :mod:`slvit_fast.reference`."""

    def __init__(self, embed_dim: int, num_heads: int, key_dim: int, mlp_dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim, eps=eps)
        self.attn = KerasStyleAttention(embed_dim, num_heads, key_dim)
        self.norm2 = nn.LayerNorm(embed_dim, eps=eps)
        self.mlp = EncoderMLP(embed_dim, mlp_dim)
