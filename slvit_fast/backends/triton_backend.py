"""The Triton backend: the SL-ViT exit as 3 fused kernel launches (forward) through ``torch.library`` ops.

Runs on CUDA tensors when Triton is importable, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before slvit_fast's kernels are imported - that is how the test suite checks
the kernels on machines without a GPU). Dtypes: float32, float16 and bfloat16, always accumulating in
fp32 (bfloat16 only compiled for GPUs: the interpreter has no bf16 arithmetic). Launches: forward
1 + 2 * num_layers (3 for the paper's exit), backward the same number of Triton kernels plus, on CUDA,
one zero-fill per encoder op for the atomic weight-gradient accumulators.

Dropout: the fused kernels implement inference and dropout-free training. When the module is in
training mode with any dropout rate > 0, the exit runs on the torch reference instead, with a one-time
warning (results stay correct, only the speed-up is lost).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import reference
from ..ops import triton_ops  # noqa: F401  (registers the torch.ops.slvit_fast.triton_* ops)
from ..ops.triton_launch import ACTIVATIONS, SUPPORTED_DTYPES, interpreted
from .common import dropout_active, reference_fallback

MAX_EMBED_DIM = 128
MAX_KEY_DIM = 128


def slvit_exit(x: Tensor, params: Sequence[Tensor], config, extra: Optional[Tensor] = None) -> Tensor:
    """The SL-ViT exit forward on the Triton ops: 1 + 2 * num_layers launches (3 for the paper's exit).

    ``params`` in op order (:func:`slvit_fast.reference.param_names`).
    """
    c = config
    p = reference.unpack_params(params, c)
    ph, pw = c.patch_size
    ops = torch.ops.slvit_fast
    t = ops.triton_patch_embed(x, *p.embed, extra, *(p.extra or (None, None)), ph, pw)
    act = ACTIVATIONS[c.activation]
    logits = None
    for i, (attn, mlp) in enumerate(zip(p.attention, p.mlp)):
        t = ops.triton_attention(t, *attn, c.num_heads, c.ln_eps)[0]
        head = p.head if i == c.num_layers - 1 else (None,) * 4  # the last layer's kernel runs the head too
        logits, t = ops.triton_mlp_head(t, *mlp, *head, c.ln_eps, c.mlp_residual, act)[:2]
    return logits


class TritonBackend:
    name = "triton"

    def unavailable_reason(self, x: Tensor) -> str | None:
        if x.dtype not in SUPPORTED_DTYPES:
            return f"the Triton kernels support float32, float16 and bfloat16 inputs, got {x.dtype}"
        if interpreted():
            if x.device.type != "cpu":
                return (f"Triton runs in interpreter mode (TRITON_INTERPRET=1), which takes CPU tensors; "
                        f"got a tensor on {x.device}")
            if x.dtype == torch.bfloat16:
                return "the Triton interpreter has no bfloat16 arithmetic (bfloat16 runs compiled, on CUDA)"
            return None
        if x.device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            return None
        return (f"compiled Triton kernels need CUDA tensors, got a tensor on {x.device} (CPU tensors run the "
                f"kernels only under the interpreter: set TRITON_INTERPRET=1 before importing slvit_fast)")

    def slvit_exit(self, module: torch.nn.Module, x: Tensor, extra: Tensor | None) -> Tensor:
        c = module.config
        if dropout_active(module):
            return reference_fallback(module, x, extra, self.name)
        if c.embed_dim > MAX_EMBED_DIM or c.key_dim > MAX_KEY_DIM:
            raise ValueError(
                f"Triton backend: embed_dim={c.embed_dim}, key_dim={c.key_dim} exceed the sizes the fused kernels "
                f"hold on chip (<= {MAX_EMBED_DIM}, <= {MAX_KEY_DIM}); use backend='torch'"
            )
        params = reference.module_params(module)
        bad = [(n, p) for n, p in zip(reference.param_names(c), params) if p.dtype != x.dtype or p.device != x.device]
        if bad:
            n, p = min(bad, key=lambda item: item[0])
            raise TypeError(
                f"Triton backend: parameter {n} is {p.dtype} on {p.device} but the feature map is {x.dtype} on "
                f"{x.device} (shape {tuple(x.shape)}); move/convert the exit with .to(x)"
            )
        return slvit_exit(x, params, c, extra)


BACKEND = TritonBackend()
