"""Backbones that torchvision does not ship (random weights; nothing is downloaded)."""

from .audiocsrnet import AudioCSRNet, AudioVisualEncoders, CountHead, FusionBlock, VGGishAudio

__all__ = ["AudioCSRNet", "AudioVisualEncoders", "CountHead", "FusionBlock", "VGGishAudio"]
