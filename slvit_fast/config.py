"""Configuration dataclasses for the exits, their costs, and the rule that sizes them for a feature map.

One place holds every hyper-parameter of an exit, so a checkpoint can store its config as plain data
and a kernel can read every size it needs from one object. A config also knows what an exit built from
it costs (``num_params()``, ``flops()`` per sample: what :mod:`slvit_fast.accounting` reports), which is
what ``for_feature_map`` needs to size the SL-ViT exit below the CNN exit on any map.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

ACTIVATIONS = ("gelu", "relu")

# The paper's exit (Table III; hidden sizes from a least-squares fit of the published parameter counts,
# see slvit_fast.exit_presets): the defaults of the configs below and the start of the sizing rule.
PAPER_EMBED_DIM = 32
PAPER_NUM_HEADS = 12
PAPER_KEY_DIM = 32
PAPER_MLP_DIM = 1024
PAPER_HEAD_HIDDEN = 268
PAPER_CNN_FILTERS = 15


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
    embed_dim: int = PAPER_EMBED_DIM
    num_heads: int = PAPER_NUM_HEADS
    key_dim: int | None = None
    mlp_dim: int = PAPER_MLP_DIM
    head_hidden: int = PAPER_HEAD_HIDDEN
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

    # -- costs per sample (what slvit_fast.accounting reports) -------------------------------------
    def num_params(self) -> int:
        """Parameters of an :class:`~slvit_fast.SLViTExit` with this config (equals the module's count)."""
        d, A, m = self.embed_dim, self.attn_dim, self.mlp_dim
        n = self.patch_dim * d + d + self.num_patches * d  # patch embedding, position embedding
        if self.extra_tokens:
            n += self.extra_dim * d + d
        per_layer = 4 * d + 3 * (d * A + A) + (A * d + d) + (d * m + m) + (m * d + d)  # 2 LN, Q/K/V, out, MLP
        return n + self.num_layers * per_layer + _head_params(self.num_tokens * d, self.head_hidden, self.num_outputs)

    def flops(self) -> int:
        """FLOPs (2 x multiply-accumulates) of one forward per sample: every matrix product of the
        reference - patch embedding, Q/K/V, ``QK^T`` and ``PV``, output projection, encoder MLP, head."""
        N, T, d, A = self.num_patches, self.num_tokens, self.embed_dim, self.attn_dim
        macs = N * self.patch_dim * d + self.extra_tokens * self.extra_dim * d
        per_layer = (3 * T * d * A  # Q, K, V projections
                     + 2 * self.num_heads * T * T * self.key_dim  # Q K^T and P V
                     + T * A * d  # output projection
                     + 2 * T * d * self.mlp_dim)  # encoder MLP
        macs += self.num_layers * per_layer + T * d * self.head_hidden + self.head_hidden * self.num_outputs
        return 2 * macs

    @classmethod
    def for_feature_map(cls, in_channels: int, feature_size: Any, num_outputs: int, **overrides: Any) -> "SLViTConfig":
        """The paper's SL-ViT exit sized for a (C, H, W) feature map, never larger than the CNN exit there.

        The rule (the paper's design, made to hold on any map):

        1. Patch: :func:`patch_for_map` - the common divisor of H and W closest to (H*W)^(1/4), i.e. a
           grid of about sqrt(side) patches per side (5-9 on maps of 25-81 px a side); it gives the
           paper's 28x28 -> 4, 25x25 -> 5 and 72x128 -> 8 exactly.
        2. Start from the paper's exit: d=32, h=12, key_dim=32, encoder MLP 1024, head hidden 268.
        3. While it has more parameters or FLOPs than ``CNNExitConfig.for_feature_map`` on the same map
           (the paper's comparison: same head hidden size, same outputs), shrink by steps of x0.9:
           first key_dim, mlp_dim and head_hidden together (floors 4, 16, 8), then, only if those are at
           their floors, num_heads and embed_dim together (floors 1, 8).

        On the paper's ResNet/DenseNet/Inception maps step 3 changes nothing (the presets come out
        exactly); on small maps (8x8, 7x7) or few channels the hidden sizes shrink, because a CNN
        exit there is small. ``overrides`` replace any field (``patch_size`` included) and are not
        shrunk; with size overrides the "not larger than the CNN exit" promise is the caller's.
        Raises ``ValueError`` if no size down to the floors fits (not seen for C <= 1024 on maps
        from 7x7 to 72x128).
        """
        size = _pair(feature_size, "feature_size")
        fixed = dict(overrides)
        base = dict(in_channels=in_channels, feature_size=size, num_outputs=num_outputs,
                    patch_size=fixed.pop("patch_size", patch_for_map(size)))
        cnn = CNNExitConfig.for_feature_map(in_channels, size, num_outputs, extra_dim=fixed.get("extra_dim", 0))
        budget = (cnn.num_params(), cnn.flops())
        cfg = None
        for sizes in _slvit_sizes(fixed.get("embed_dim")):
            cfg = cls(**{**base, **sizes, **fixed})
            if cfg.num_params() <= budget[0] and cfg.flops() <= budget[1]:
                return cfg
        if fixed.keys() & {"embed_dim", "num_heads", "key_dim", "mlp_dim", "head_hidden", "num_layers"}:
            return cfg  # the caller fixed the sizes
        raise ValueError(
            f"SLViTConfig.for_feature_map: no SL-ViT exit down to the smallest sizes has at most the CNN exit's "
            f"{budget[0]} parameters and {budget[1]} FLOPs on a {size[0]}x{size[1]}x{in_channels} map "
            f"(smallest tried: {cfg.num_params()} parameters, {cfg.flops()} FLOPs); pass patch_size=..."
        )

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
    filters: int = PAPER_CNN_FILTERS
    kernel_size: int = 3
    pool_size: tuple[int, int] = (2, 2)
    head_hidden: int = PAPER_HEAD_HIDDEN
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

    def num_params(self) -> int:
        """Parameters of a :class:`~slvit_fast.CNNExit` with this config (equals the module's count)."""
        n = self.in_channels * self.filters * self.kernel_size ** 2 + self.filters
        if self.extra_dim:
            n += 2 * (self.extra_dim * self.in_channels + self.in_channels)  # FiLM gamma, beta
        return n + _head_params(self.flat_dim, self.head_hidden, self.num_outputs)

    def flops(self) -> int:
        """FLOPs (2 x multiply-accumulates) of one forward per sample: FiLM projections, conv, head."""
        H, W = self.feature_size
        macs = H * W * self.in_channels * self.filters * self.kernel_size ** 2
        macs += 2 * self.extra_dim * self.in_channels
        macs += self.flat_dim * self.head_hidden + self.head_hidden * self.num_outputs
        return 2 * macs

    @classmethod
    def for_feature_map(cls, in_channels: int, feature_size: Any, num_outputs: int,
                        **overrides: Any) -> "CNNExitConfig":
        """The paper's CNN exit for a (C, H, W) feature map: 15 filters 3x3, head hidden 268, max-pool 2x2
        - 4x4 where the SL-ViT patch (:func:`patch_for_map`) is 8 or more, as on the paper's 72x128
        DISCO maps - clipped to the map. ``overrides`` replace any field."""
        size = _pair(feature_size, "feature_size")
        pool = 4 if patch_for_map(size) >= 8 else 2
        pool = max(1, min(pool, *size))
        kwargs = dict(in_channels=in_channels, feature_size=size, num_outputs=num_outputs, pool_size=(pool, pool))
        return cls(**{**kwargs, **overrides})

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


def patch_for_map(feature_size: Any) -> int:
    """The paper's patch rule: the common divisor of H and W closest to (H*W)^(1/4) (the larger on a tie).

    The patch side is then about the grid side: 28x28 -> 4 (7x7 grid), 25x25 -> 5 (5x5), 72x128 -> 8
    (9x16), 14x14 -> 2 (7x7), 8x8 -> 2 (4x4), 7x7 -> 1 (7x7), 56x56 -> 7 (8x8).
    """
    H, W = _pair(feature_size, "feature_size")
    target = math.sqrt(math.sqrt(H * W))
    divisors = [p for p in range(1, min(H, W) + 1) if H % p == 0 and W % p == 0]
    return min(divisors, key=lambda p: (abs(p - target), -p))


def _head_params(flat: int, hidden: int, outputs: int) -> int:
    return flat * hidden + hidden + hidden * outputs + outputs


def _slvit_sizes(embed_dim: int | None):
    """SL-ViT sizes from the paper's down to the floors, each step x0.9 (see SLViTConfig.for_feature_map).

    ``embed_dim``: the caller's fixed width, if any (key_dim starts at the width, Keras' default)."""
    def scaled(value: int, factor: float, floor: int) -> int:
        return max(floor, round(value * factor))

    def sizes(s: float, t: float) -> dict[str, int]:
        width = scaled(PAPER_EMBED_DIM, t, 8)
        return dict(embed_dim=width, num_heads=scaled(PAPER_NUM_HEADS, t, 1),
                    key_dim=scaled(embed_dim or width, s, 4), mlp_dim=scaled(PAPER_MLP_DIM, s, 16),
                    head_hidden=scaled(PAPER_HEAD_HIDDEN, s, 8))

    s = 1.0
    while True:  # key_dim, mlp_dim, head_hidden shrink together until all three are at their floors
        yield sizes(s, 1.0)
        if (PAPER_MLP_DIM * s <= 16 and PAPER_HEAD_HIDDEN * s <= 8 and (embed_dim or PAPER_EMBED_DIM) * s <= 4):
            break
        s *= 0.9
    t = 0.9
    while True:  # then heads and width, until both are at their floors
        yield sizes(s, t)
        if PAPER_NUM_HEADS * t <= 1 and PAPER_EMBED_DIM * t <= 8:
            break
        t *= 0.9


def _known_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
    return dict(data)
