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

import threading
import warnings

import torch
from torch import Tensor

from .. import reference
from ..ops import triton_ops

_warned: set[str] = set()
_lock = threading.Lock()
MAX_EMBED_DIM = 128
MAX_KEY_DIM = 128


def _interpreted() -> bool:
    return triton_ops.interpreted()


def _warn_once(message: str) -> None:
    with _lock:
        if message in _warned:
            return
        _warned.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


class TritonBackend:
    name = "triton"

    def unavailable_reason(self, x: Tensor) -> str | None:
        if x.dtype not in triton_ops.SUPPORTED_DTYPES:
            return f"the Triton kernels support float32, float16 and bfloat16 inputs, got {x.dtype}"
        if _interpreted():
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
        params = dict(module.named_parameters())
        if module.training and (c.dropout > 0 or c.attention_dropout > 0 or c.head_dropout > 0):
            _warn_once(
                "slvit_fast: the Triton backend does not fuse dropout; this exit is in training mode with "
                f"dropout={c.dropout}, attention_dropout={c.attention_dropout}, head_dropout={c.head_dropout}, "
                "so it runs on the torch reference (call .eval() or set the rates to 0 for the fused kernels)"
            )
            return reference.slvit_exit(x, params, c, extra, training=True)
        if c.embed_dim > MAX_EMBED_DIM or c.key_dim > MAX_KEY_DIM:
            raise ValueError(
                f"Triton backend: embed_dim={c.embed_dim}, key_dim={c.key_dim} exceed the sizes the fused kernels "
                f"hold on chip (<= {MAX_EMBED_DIM}, <= {MAX_KEY_DIM}); use backend='torch'"
            )
        bad = sorted(n for n, p in params.items() if p.dtype != x.dtype or p.device != x.device)
        if bad:
            p = params[bad[0]]
            raise TypeError(
                f"Triton backend: parameter {bad[0]} is {p.dtype} on {p.device} but the feature map is {x.dtype} on "
                f"{x.device} (shape {tuple(x.shape)}); move/convert the exit with .to(x)"
            )
        return triton_ops.slvit_exit(x, params, c, extra)


BACKEND = TritonBackend()
