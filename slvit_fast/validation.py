"""Input checks run before any backend: a clear error here beats a crash deep inside a kernel."""

from __future__ import annotations

from torch import Tensor

from .errors import SLViTInputError


def check_feature_map(x: Tensor, in_channels: int, feature_size: tuple[int, int], what: str) -> None:
    """``x`` must be a floating (B, C, H, W) tensor with C and (H, W) as configured."""
    if not isinstance(x, Tensor):
        raise SLViTInputError(f"{what}: expected a torch.Tensor feature map, got {type(x).__name__}")
    if x.dim() != 4:
        raise SLViTInputError(
            f"{what}: expected a 4-D feature map (B, C, H, W), got shape {tuple(x.shape)} (rank {x.dim()})"
        )
    if not x.is_floating_point():
        raise SLViTInputError(f"{what}: expected a floating-point feature map, got dtype {x.dtype}")
    B, C, H, W = x.shape
    if C != in_channels:
        raise SLViTInputError(
            f"{what}: feature map has {C} channels but the config expects in_channels={in_channels} "
            f"(shape {tuple(x.shape)}; tensors are NCHW - pass channels_last memory format, not NHWC shape)"
        )
    if (H, W) != tuple(feature_size):
        raise SLViTInputError(
            f"{what}: feature map is {H}x{W} but the config expects feature_size={tuple(feature_size)} "
            f"(shape {tuple(x.shape)})"
        )
    if B == 0:
        raise SLViTInputError(f"{what}: empty batch (shape {tuple(x.shape)})")


def check_extra(extra: Tensor | None, x: Tensor, extra_tokens: int, extra_dim: int, what: str) -> None:
    """Extra (audio) tokens: required iff the config has them, shape (B, E, extra_dim)."""
    if extra_tokens == 0:
        if extra is not None:
            raise SLViTInputError(f"{what}: got extra tokens but the config has extra_tokens=0")
        return
    if extra is None:
        raise SLViTInputError(
            f"{what}: the config expects extra tokens of shape (B, {extra_tokens}, {extra_dim}); pass extra=..."
        )
    expected = (x.shape[0], extra_tokens, extra_dim)
    if not isinstance(extra, Tensor) or tuple(extra.shape) != expected:
        got = tuple(extra.shape) if isinstance(extra, Tensor) else type(extra).__name__
        raise SLViTInputError(f"{what}: extra tokens must have shape {expected}, got {got}")
    if extra.dtype != x.dtype or extra.device != x.device:
        raise SLViTInputError(
            f"{what}: extra tokens are {extra.dtype} on {extra.device} but the feature map is "
            f"{x.dtype} on {x.device}"
        )
