"""GPU performance without a GPU: a roofline model of the fused exit vs eager PyTorch.

For each fused kernel of the exit (the Triton path's three launches) at a preset's shape: FLOPs
(2 x MACs), the minimum HBM bytes (read every input and weight once, write every output once - the
fused design keeps all intermediates on chip) and the H100 SXM time bound
``max(FLOPs / peak, bytes / bandwidth)``. Next to it, eager PyTorch's launch count and HBM traffic
for the same exit, measured by running the reference under a dispatch-mode op counter on fake tensors
(no arithmetic): every non-view aten op is one kernel launch that reads its inputs from and writes its
outputs to HBM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import reference
from .config import SLViTConfig
from .slvit_exit import SLViTExit

# H100 SXM peaks (dense): HBM3 bandwidth and compute by precision.
H100 = {"hbm_bytes_per_s": 3.35e12, "fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12}
LAUNCH_OVERHEAD_S = 3e-6  # a typical per-kernel launch + scheduling gap on a GPU; for the eager estimate


@dataclass
class KernelRoofline:
    kernel: str
    flops: float
    min_bytes: float
    bound_s: float
    limited_by: str

    def to_dict(self) -> dict:
        return asdict(self)


def _bound(flops: float, nbytes: float, precision: str) -> tuple[float, str]:
    t_compute, t_memory = flops / H100[precision], nbytes / H100["hbm_bytes_per_s"]
    return max(t_compute, t_memory), ("compute" if t_compute > t_memory else "memory")


def fused_kernels(c: SLViTConfig, batch: int, dtype: torch.dtype = torch.float32) -> list[KernelRoofline]:
    """The three fused forward kernels of the exit at ``batch``: FLOPs, minimum bytes, H100 bound."""
    s = torch.tensor([], dtype=dtype).element_size()
    precision = {torch.float32: "tf32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    B, N, T, d, A, P = batch, c.num_patches, c.num_tokens, c.embed_dim, c.attn_dim, c.patch_dim
    E, De = c.extra_tokens, c.extra_dim
    H, W = c.feature_size
    kernels = []
    flops = 2 * B * (N * P * d + E * De * d)
    nbytes = s * (B * c.in_channels * H * W + P * d + d + N * d + B * E * De + De * d + d + B * T * d)
    kernels.append(("patch_embed", flops, nbytes))
    for layer in range(c.num_layers):
        flops = 2 * B * (3 * T * d * A + 2 * c.num_heads * T * T * c.key_dim + T * A * d)
        nbytes = s * (2 * B * T * d + 4 * d * A + 3 * A + d + 2 * d)
        kernels.append((f"attention_block[{layer}]", flops, nbytes))
        last = layer == c.num_layers - 1
        head_flops = T * d * c.head_hidden + c.head_hidden * c.num_outputs if last else 0
        flops = 2 * B * (2 * T * d * c.mlp_dim + head_flops)
        head_bytes = (T * d * c.head_hidden + c.head_hidden + c.head_hidden * c.num_outputs + c.num_outputs
                      + B * c.num_outputs) if last else B * T * d
        nbytes = s * (B * T * d + 2 * d * c.mlp_dim + c.mlp_dim + d + 2 * d + head_bytes)
        kernels.append((f"mlp_block+head[{layer}]" if last else f"mlp_block[{layer}]", flops, nbytes))
    out = []
    for name, flops, nbytes in kernels:
        t, limit = _bound(flops, nbytes, precision)
        out.append(KernelRoofline(name, float(flops), float(nbytes), t, limit))
    return out


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        produces_tensor = any(isinstance(o, torch.Tensor) for o in torch.utils._pytree.tree_leaves(out))
        if produces_tensor and func.namespace == "aten" and not _is_view(func):
            self.launches += 1
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def _is_view(func) -> bool:
    schema = func._schema
    return any(a.alias_info is not None and not a.alias_info.is_write for a in schema.returns) or \
        func.__name__.split(".")[0] in ("view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute",
                                        "unsqueeze", "squeeze", "slice", "select", "alias", "detach")


@torch.no_grad()
def eager_traffic(c: SLViTConfig, batch: int, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(kernel launches, HBM bytes) of eager PyTorch running the reference exit forward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = SLViTExit(c, backend="torch").to(dtype).eval()  # real (small) weights; the activations are fake
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(batch, c.in_channels, *c.feature_size, dtype=dtype)
        extra = torch.empty(batch, c.extra_tokens, c.extra_dim, dtype=dtype) if c.extra_tokens else None
        params = dict(m.named_parameters())
        with _OpCounter() as counter:
            reference.slvit_exit(x, params, c, extra)
    return counter.launches, counter.bytes


def exit_roofline(c: SLViTConfig, batch: int, dtype: torch.dtype = torch.float32) -> dict:
    kernels = fused_kernels(c, batch, dtype)
    launches, nbytes = eager_traffic(c, batch, dtype)
    fused_bound = sum(k.bound_s for k in kernels)
    eager_bound = nbytes / H100["hbm_bytes_per_s"] + launches * LAUNCH_OVERHEAD_S
    return {
        "batch": batch, "dtype": str(dtype).replace("torch.", ""),
        "kernels": [k.to_dict() for k in kernels],
        "fused_launches": len(kernels), "fused_bytes": sum(k.min_bytes for k in kernels), "fused_bound_s": fused_bound,
        "eager_launches": launches, "eager_bytes": nbytes, "eager_estimate_s": eager_bound,
    }


def format_roofline(preset: str, r: dict) -> str:
    lines = [f"{preset} batch {r['batch']} {r['dtype']}:"]
    for k in r["kernels"]:
        lines.append(f"  {k['kernel']:<20} {k['flops'] / 1e6:10.2f} MFLOP {k['min_bytes'] / 1e6:9.3f} MB  "
                     f"H100 bound {k['bound_s'] * 1e6:8.2f} us ({k['limited_by']})")
    lines.append(f"  fused: {r['fused_launches']} launches, {r['fused_bytes'] / 1e6:.3f} MB, bound "
                 f"{r['fused_bound_s'] * 1e6:.2f} us | eager: {r['eager_launches']} launches, "
                 f"{r['eager_bytes'] / 1e6:.3f} MB, ~{r['eager_estimate_s'] * 1e6:.1f} us "
                 f"(bytes at full bandwidth + {LAUNCH_OVERHEAD_S * 1e6:.0f} us per launch)")
    return "\n".join(lines)
