"""GPU performance without a GPU: a roofline model of the fused exit vs eager PyTorch.

For each fused kernel of the exit (the Triton path's three launches) at a preset's shape: FLOPs
(2 x MACs), the minimum HBM bytes (read every input and weight once, write every output once - the
fused design keeps all intermediates on chip) and the H100 SXM time bound
``max(FLOPs / peak, bytes / bandwidth)``. Next to it, eager PyTorch's launch count and HBM traffic
for the same exit, measured by running the reference under a dispatch-mode op counter on fake tensors
(no arithmetic): every non-view aten op is one kernel launch that reads its inputs from and writes its
outputs to HBM.

The CUDA-graph anchor (what a GPU user tries first against launch cost, ``torch.compile(mode=
"reduce-overhead")``) sits beside eager, with the per-launch gap replaced by the cost of one graph
launch plus a small per-node gap (figures and sources at ``GRAPH_LAUNCH_S``):

* ``graph_eager`` - eager's own kernels and bytes replayed from a CUDA graph (the launch gap alone
  removed);
* ``reduce_overhead`` - inductor + CUDA graph, estimated from the same op stream: matmuls stay library
  calls (one kernel each, as inductor emits them), every maximal run of other ops between two matmuls
  becomes one fused kernel that reads only what comes from outside the run and writes only what is
  used after it. Inductor may fuse a little more (matmul epilogues) or less (a reduction split off),
  so this is an estimate of its kernel count and traffic, not a bound.

All three anchors (eager, graph_eager, reduce_overhead) take each kernel's time as
``max(FLOPs / peak, bytes / bandwidth)`` (matmul FLOPs only; the rest is memory-bound) plus their
launch or graph costs.
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
# CUDA graph replay. One cudaGraphLaunch: ~2.5 us of host + launch latency for a straight-line graph of any
# length since CUDA 12.6 (NVIDIA technical blog "Constant Time Launch for Straight-Line CUDA Graphs and
# Other Performance Enhancements", 2024). Per kernel node inside the graph: ~0.5 us of device-side gap, from
# NVIDIA's "Getting Started with CUDA Graphs" (2019), where 20 back-to-back ~2.9 us kernels took 3.8 us
# each from a stream and 3.4 us each from a graph. Both are assumptions until measured on the target GPU
# (`slvit-fast selftest --device cuda` times reduce-overhead).
GRAPH_LAUNCH_S = 2.5e-6
GRAPH_NODE_S = 0.5e-6
# aten ops inductor leaves to the BLAS library (one kernel each); everything else it may fuse
GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


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


@dataclass
class _Op:
    name: str
    gemm: bool
    flops: float  # matmul FLOPs (0 for other ops)
    reads: list[tuple[object, int]]  # (storage key, bytes) of each tensor input
    writes: list[tuple[object, int]]  # (storage key, bytes) of each tensor output


def _gemm_flops(name: str, args) -> float:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    a, b = tensors[-2], tensors[-1]  # (bias/input,) mat1, mat2
    if name in ("mm", "addmm"):
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]  # bmm / baddbmm


class _OpCounter(TorchDispatchMode):
    """Records every non-view aten op: one eager kernel launch reading its inputs, writing its outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[_Op] = []

    @property
    def launches(self) -> int:
        return len(self.ops)

    @property
    def bytes(self) -> int:
        return sum(n for op in self.ops for _, n in op.reads + op.writes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        produces_tensor = any(isinstance(o, torch.Tensor) for o in torch.utils._pytree.tree_leaves(out))
        if produces_tensor and func.namespace == "aten" and not _is_view(func):
            name = func.__name__.split(".")[0]
            ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            gemm = name in GEMM_OPS
            self.ops.append(_Op(name, gemm, _gemm_flops(name, args) if gemm else 0.0,
                                [(_storage_key(t), t.numel() * t.element_size()) for t in ins],
                                [(_storage_key(t), t.numel() * t.element_size()) for t in outs]))
        return out


def _storage_key(t: torch.Tensor):
    """Identity of a tensor's storage (views share it), valid for fake tensors."""
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(t.untyped_storage())


def _fused_kernels(ops: list[_Op]) -> list[tuple[float, float]]:
    """(FLOPs, bytes) per kernel after inductor-style fusion: matmuls alone, runs of other ops fused."""
    kernels, i = [], 0
    while i < len(ops):
        if ops[i].gemm:
            op = ops[i]
            kernels.append((op.flops, float(sum(n for _, n in op.reads + op.writes))))
            i += 1
            continue
        j = i
        while j < len(ops) and not ops[j].gemm:
            j += 1
        run, later = ops[i:j], ops[j:]
        produced = {k for op in run for k, _ in op.writes}
        used_later = {k for op in later for k, _ in op.reads}
        reads = {k: n for op in run for k, n in op.reads if k not in produced}
        final = j == len(ops)
        last_out = {k for k, _ in ops[-1].writes}
        writes = {k: n for op in run for k, n in op.writes if k in used_later or (final and k in last_out)}
        kernels.append((0.0, float(sum(reads.values()) + sum(writes.values()))))
        i = j
    return kernels


def _is_view(func) -> bool:
    schema = func._schema
    return any(a.alias_info is not None and not a.alias_info.is_write for a in schema.returns) or \
        func.__name__.split(".")[0] in ("view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute",
                                        "unsqueeze", "squeeze", "slice", "select", "alias", "detach")


def _precision(dtype: torch.dtype) -> str:
    return {torch.float32: "tf32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


@torch.no_grad()
def eager_ops(c: SLViTConfig, batch: int, dtype: torch.dtype = torch.float32) -> list[_Op]:
    """The aten ops (one kernel each) eager PyTorch runs for the reference exit forward, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = SLViTExit(c, backend="torch").to(dtype).eval()  # real (small) weights; the activations are fake
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(batch, c.in_channels, *c.feature_size, dtype=dtype)
        extra = torch.empty(batch, c.extra_tokens, c.extra_dim, dtype=dtype) if c.extra_tokens else None
        params = dict(m.named_parameters())
        with _OpCounter() as counter:
            reference.slvit_exit(x, params, c, extra)
    return counter.ops


def eager_traffic(c: SLViTConfig, batch: int, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(kernel launches, HBM bytes) of eager PyTorch running the reference exit forward."""
    ops = eager_ops(c, batch, dtype)
    return len(ops), sum(n for op in ops for _, n in op.reads + op.writes)


def _kernel_time(flops: float, nbytes: float, precision: str) -> float:
    return _bound(flops, nbytes, precision)[0]


def exit_roofline(c: SLViTConfig, batch: int, dtype: torch.dtype = torch.float32) -> dict:
    kernels = fused_kernels(c, batch, dtype)
    precision = _precision(dtype)
    ops = eager_ops(c, batch, dtype)
    launches = len(ops)
    nbytes = sum(n for op in ops for _, n in op.reads + op.writes)
    eager_kernels_s = sum(_kernel_time(op.flops, sum(n for _, n in op.reads + op.writes), precision) for op in ops)
    fused_ro = _fused_kernels(ops)
    ro_kernels_s = sum(_kernel_time(f, b, precision) for f, b in fused_ro)
    fused_bound = sum(k.bound_s for k in kernels)
    return {
        "batch": batch, "dtype": str(dtype).replace("torch.", ""),
        "kernels": [k.to_dict() for k in kernels],
        "fused_launches": len(kernels), "fused_bytes": sum(k.min_bytes for k in kernels), "fused_bound_s": fused_bound,
        "eager_launches": launches, "eager_bytes": nbytes,
        "eager_estimate_s": eager_kernels_s + launches * LAUNCH_OVERHEAD_S,
        # eager's kernels replayed from one CUDA graph: launch gaps replaced by the graph's costs
        "graph_eager_estimate_s": eager_kernels_s + GRAPH_LAUNCH_S + launches * GRAPH_NODE_S,
        # torch.compile(mode="reduce-overhead"): inductor-fused kernels replayed from a CUDA graph (estimate)
        "reduce_overhead_launches": len(fused_ro),
        "reduce_overhead_bytes": sum(b for _, b in fused_ro),
        "reduce_overhead_estimate_s": ro_kernels_s + GRAPH_LAUNCH_S + len(fused_ro) * GRAPH_NODE_S,
        "graph_costs": {"launch_s": GRAPH_LAUNCH_S, "per_node_s": GRAPH_NODE_S, "eager_gap_s": LAUNCH_OVERHEAD_S},
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
    lines.append(f"  CUDA graph: eager kernels ~{r['graph_eager_estimate_s'] * 1e6:.1f} us | reduce-overhead "
                 f"(inductor fusion, estimated) {r['reduce_overhead_launches']} kernels, "
                 f"{r['reduce_overhead_bytes'] / 1e6:.3f} MB, ~{r['reduce_overhead_estimate_s'] * 1e6:.1f} us "
                 f"({GRAPH_LAUNCH_S * 1e6:.1f} us per graph launch + {GRAPH_NODE_S * 1e6:.1f} us per node) | "
                 f"fused bound {r['fused_bound_s'] * 1e6:.2f} us = "
                 f"{r['reduce_overhead_estimate_s'] / max(r['fused_bound_s'], 1e-12):.1f}x faster than reduce-overhead")
    return "\n".join(lines)
