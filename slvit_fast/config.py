"""Configuration dataclasses for the exits.

One place holds every hyper-parameter of an exit, so a checkpoint can store its config as plain data
and a kernel can read every size it needs from one object.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

ACTIVATIONS = ("gelu", "relu")


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if a <= 0 or b <= 0:
        raise ValueError(f"{name} must be positive, got {(a, b)}")
    return a, b


def _positive_int(value: Any, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")
    return value


def _rate(value: Any, name: str) -> float:
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


@dataclass(frozen=True)
class SLViTConfig:
    """Hyper-parameters of one single-layer vision transformer exit (paper §III-A, Table III).

    Patches are ``patch_size = (ph, pw)`` non-overlapping windows of the ``feature_size = (H, W)`` map;
    each is flattened in (row-in-patch, column-in-patch, channel) order - the order of Keras'
    ``tf.image.extract_patches`` - and tokens are numbered row-major over the (H/ph, W/pw) grid.
    Attention follows Keras ``MultiHeadAttention``: ``num_heads`` heads each ``key_dim`` wide
    (default ``embed_dim``), output projection ``num_heads * key_dim -> embed_dim``.
    """

    in_channels: int
    feature_size: tuple[int, int]
    patch_size: tuple[int, int]
    embed_dim: int = 32
    num_heads: int = 12
    key_dim: int | None = None
    mlp_dim: int = 1024
    head_hidden: int = 268
    num_outputs: int = 10
    attention_dropout: float = 0.0
    dropout: float = 0.0
    head_dropout: float = 0.0
    mlp_residual: bool = True
    ln_eps: float = 1e-6
    activation: str = "gelu"
    num_layers: int = 1
    extra_tokens: int = 0
    extra_dim: int = 0

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("in_channels", _positive_int(self.in_channels, "in_channels"))
        set_("feature_size", _pair(self.feature_size, "feature_size"))
        set_("patch_size", _pair(self.patch_size, "patch_size"))
        for name in ("embed_dim", "num_heads", "mlp_dim", "head_hidden", "num_outputs", "num_layers"):
            _positive_int(getattr(self, name), name)
        set_("key_dim", self.embed_dim if self.key_dim is None else _positive_int(self.key_dim, "key_dim"))
        for name in ("attention_dropout", "dropout", "head_dropout"):
            set_(name, _rate(getattr(self, name), name))
        if not (math.isfinite(float(self.ln_eps)) and float(self.ln_eps) > 0):
            raise ValueError(f"ln_eps must be a positive finite number, got {self.ln_eps!r}")
        set_("ln_eps", float(self.ln_eps))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        _positive_int(self.extra_tokens, "extra_tokens", allow_zero=True)
        _positive_int(self.extra_dim, "extra_dim", allow_zero=True)
        if (self.extra_tokens > 0) != (self.extra_dim > 0):
            raise ValueError(
                "extra_tokens and extra_dim go together: both > 0 for an audiovisual exit, both 0 otherwise;"
                f" got extra_tokens={self.extra_tokens}, extra_dim={self.extra_dim}"
            )
        (H, W), (ph, pw) = self.feature_size, self.patch_size
        if H % ph or W % pw:
            raise ValueError(
                f"feature map {H}x{W} is not divisible by the patch {ph}x{pw} "
                f"(SL-ViT uses VALID, non-overlapping patches; choose a patch size that divides it)"
            )

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """Patches along (height, width)."""
        return self.feature_size[0] // self.patch_size[0], self.feature_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def num_tokens(self) -> int:
        """Tokens the encoder sees: patches plus appended extra (audio) tokens."""
        return self.num_patches + self.extra_tokens

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size[0] * self.patch_size[1]

    @property
    def attn_dim(self) -> int:
        """Width of the concatenated Q/K/V projections: heads x key_dim (Keras semantics)."""
        return self.num_heads * self.key_dim

    def replace(self, **changes: Any) -> "SLViTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["feature_size"] = list(self.feature_size)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SLViTConfig":
        return cls(**_known_fields(cls, data))


@dataclass(frozen=True)
class CNNExitConfig:
    """The paper's baseline exit: conv 3x3 ('same') -> ReLU -> max-pool -> flatten -> MLP head."""

    in_channels: int
    feature_size: tuple[int, int]
    filters: int = 15
    kernel_size: int = 3
    pool_size: tuple[int, int] = (2, 2)
    head_hidden: int = 268
    num_outputs: int = 10
    head_dropout: float = 0.0
    activation: str = "gelu"
    extra_dim: int = 0  # > 0: FiLM fusion of an extra (audio) vector before the conv (AV1 CNN exit)
    extra_tokens: int = field(default=0, repr=False)  # kept for symmetry with SLViTConfig; FiLM uses 1

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("in_channels", _positive_int(self.in_channels, "in_channels"))
        set_("feature_size", _pair(self.feature_size, "feature_size"))
        set_("pool_size", _pair(self.pool_size, "pool_size"))
        for name in ("filters", "kernel_size", "head_hidden", "num_outputs"):
            _positive_int(getattr(self, name), name)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {self.kernel_size}")
        set_("head_dropout", _rate(self.head_dropout, "head_dropout"))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        _positive_int(self.extra_dim, "extra_dim", allow_zero=True)
        (H, W), (py, px) = self.feature_size, self.pool_size
        if H < py or W < px:
            raise ValueError(f"feature map {H}x{W} is smaller than the pool {py}x{px}")

    @property
    def pooled_size(self) -> tuple[int, int]:
        # Floor division: Keras MaxPooling2D with 'valid' padding (25x25 -> 12x12 on InceptionV3).
        return self.feature_size[0] // self.pool_size[0], self.feature_size[1] // self.pool_size[1]

    @property
    def flat_dim(self) -> int:
        ph, pw = self.pooled_size
        return ph * pw * self.filters

    def replace(self, **changes: Any) -> "CNNExitConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("feature_size", "pool_size"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CNNExitConfig":
        return cls(**_known_fields(cls, data))


def _known_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
    return dict(data)
