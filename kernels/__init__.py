"""Triton kernels for the fused SL-ViT exit (installed as ``slvit_fast.kernels``)."""
