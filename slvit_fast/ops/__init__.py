"""Custom torch ops (``torch.library``) wrapping each backend's fused kernels.

One module per backend family registers its ops under the ``slvit_fast::`` namespace with a fake
(meta) implementation and autograd, so ``torch.compile(fullgraph=True)`` and ``opcheck`` work.
Backends (``slvit_fast.backends.*``) call these ops; modules never call kernels directly.
"""
