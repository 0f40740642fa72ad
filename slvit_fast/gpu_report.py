"""Ahead-of-time GPU compile report: compile every kernel configuration the presets use, no GPU needed.

Each Triton kernel launch of the exit (forward and backward) is described by the same ``Launch`` object
the backend runs (:mod:`slvit_fast.ops.triton_launch`), built here on ``meta`` tensors of the preset's
shapes. It is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and
the cubin is inspected with ``cuobjdump -res-usage`` (shipped with Triton) for registers, shared memory
and LOCAL (spill / stack) bytes.

Other kernel families (e.g. CUDA C++) join the report by registering a row provider::

    from slvit_fast import gpu_report
    gpu_report.register_provider("cuda", lambda archs: [ {...row...}, ... ])

A row is a dict with keys ``family, kernel, config, dtype, arch, registers, shared_bytes, local_bytes,
stack_bytes, spill_bytes (= stack + local), presets, ok, error``, plus (when the provider knows them)
``threads_per_block``, ``tensor_core_instructions`` (count of tensor-core opcodes - HMMA, HGMMA, IMMA, ...
- in ``cuobjdump -sass`` of the cubin, :func:`slvit_fast.native.parse_sass_tensor_core`) and
``matmul_stage`` (the kernel has a GEMM stage). :func:`report_rows` adds the theoretical occupancy
(``blocks_per_sm``, ``warps_per_sm``, ``occupancy``, ``occupancy_limiter``; :mod:`slvit_fast.occupancy`)
and fails (``ok=False``) every row that must run its GEMMs on tensor cores but has no tensor-core
instruction: fp16 / bf16 / TF32 kernels with a matmul stage (``tensor_core_required``; fp32 at
"highest" and IEEE are exempt). ``slvit-fast gpu-report [--json]`` (:mod:`slvit_fast.gpu_report_cli`)
prints all rows and exits non-zero on any failed row.

Triton kernels cannot be compiled while ``TRITON_INTERPRET=1`` (the kernels are then interpreter
objects); :func:`report_rows` then runs the Triton part in a subprocess without that variable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterable

import torch

from .native import cuobjdump, parse_res_usage, parse_sass_tensor_core
from .occupancy import occupancy

DEFAULT_ARCHS = (80, 90)
# "float32": fp32 models at torch's default matmul precision "highest" (3xTF32 dots on the GPU);
# "float32-tf32": fp32 at "high"/"medium" (TF32 dots); "float32-ieee": diagnostic, FMA (IEEE) dots as in
# the interpreter - not used on GPUs because it spills; then the half types.
DEFAULT_DTYPES = ("float32", "float32-tf32", "float16", "bfloat16")
DTYPE_VARIANTS = ("float32", "float32-tf32", "float32-ieee", "float16", "bfloat16")
# Rows whose GEMM stages must be on tensor cores. float32 ("highest": 3xTF32 dots on Triton, exact SIMT in
# the CUDA C++ kernels) and float32-ieee (FMA dots) may legitimately have none.
TENSOR_CORE_DTYPES = ("float16", "bfloat16", "float32-tf32")
# Triton kernels with GEMM stages (tl.dot): all of them. A kernel listed here whose IR has no tt.dot
# still must show tensor-core instructions in half precision (a GEMM rewritten as FMA loops is a failure).
TRITON_MATMUL_KERNELS = frozenset({"patch_embed_fwd_kernel", "attention_fwd_kernel", "mlp_head_fwd_kernel",
                                   "patch_embed_bwd_kernel", "attention_bwd_kernel", "mlp_head_bwd_kernel"})
_PROVIDERS: dict[str, Callable[[tuple[int, ...]], list[dict[str, Any]]]] = {}


def register_provider(family: str, provider: Callable[[tuple[int, ...]], list[dict[str, Any]]]) -> None:
    """Add a kernel family to the report; ``provider(archs)`` returns rows (see module docstring)."""
    _PROVIDERS[family] = provider


def _sig_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {value!r}")


def compile_launch(launch: Any, arch: int) -> dict[str, Any]:
    """Compile one :class:`~slvit_fast.ops.triton_launch.Launch` for ``sm_<arch>``; returns resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = launch.kernel
    signature = {}
    for name in kernel.arg_names:
        if name in launch.meta:
            signature[name] = "constexpr"
        else:
            signature[name] = _sig_type(launch.args[name])
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(launch.meta))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch.options())
    cubin = compiled.asm["cubin"]
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (expected in triton/backends/nvidia/bin)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    rows = parse_res_usage(text)
    if not rows:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output: {text[:500]!r}")
    usage = {k: rows[0][k] for k in ("registers", "stack_bytes", "shared_bytes", "local_bytes")}
    # spills live in the stack frame (cuobjdump's LOCAL is per-kernel local arrays): count both
    usage["spill_bytes"] = usage["stack_bytes"] + usage["local_bytes"]
    usage["shared_bytes"] = max(usage["shared_bytes"], int(getattr(compiled.metadata, "shared", 0) or 0))
    tc = parse_sass_tensor_core(sass)
    if not tc or not tc[0]["instructions"]:
        raise RuntimeError(f"cannot parse cuobjdump -sass output: {sass[:500]!r}")
    usage["tensor_core_instructions"] = sum(r["tensor_core_instructions"] for r in tc)
    ops: dict[str, int] = {}
    for r in tc:
        for op, n in r["tensor_core_ops"].items():
            ops[op] = ops.get(op, 0) + n
    usage["tensor_core_ops"] = ops
    usage["dot_ops"] = len(re.findall(r"\btt\.dot\b", compiled.asm.get("ttir", "")))
    usage["threads_per_block"] = 32 * int(getattr(compiled.metadata, "num_warps", launch.num_warps))
    return usage


def preset_launches(preset: str, dtype: torch.dtype, batch: int = 2) -> list[Any]:
    """Every Triton launch (forward and backward) of the preset's exit, described on meta tensors."""
    from .exit_presets import get_preset
    from .config import SLViTConfig
    from .ops import triton_launch as T

    c = SLViTConfig(**get_preset(preset).slvit_kwargs())
    dev = "meta"
    e = lambda *s, dt=dtype: torch.empty(s, device=dev, dtype=dt)  # noqa: E731
    f32 = torch.float32
    B, D, A, Fd = batch, c.embed_dim, c.attn_dim, c.mlp_dim
    N, Tn, K = c.num_patches, c.num_tokens, c.patch_dim
    ph, pw = c.patch_size
    x = e(B, c.in_channels, *c.feature_size)
    w, bias, pos = e(D, K), e(D), e(N, D)
    extra = e(B, c.extra_tokens, c.extra_dim) if c.extra_tokens else None
    we = e(D, c.extra_dim) if c.extra_tokens else None
    be = e(D) if c.extra_tokens else None
    t = e(B, Tn, D, dt=f32)
    lnw, lnb = e(D), e(D)
    wq, bq = e(A, D), e(A)
    wo = e(D, A)
    KD = c.key_dim
    H = c.num_heads
    attn_outs = (t, e(B, Tn, dt=f32), e(B, Tn, dt=f32), e(B, H, Tn, KD, dt=f32), e(B, H, Tn, KD, dt=f32),
                 e(B, H, Tn, KD, dt=f32), e(B, Tn, A, dt=f32), e(B, H, Tn, dt=f32))
    w1, b1, w2, b2 = e(Fd, D), e(Fd), e(D, Fd), e(D)
    hw1, hb1, hw2, hb2 = e(c.head_hidden, Tn * D), e(c.head_hidden), e(c.num_outputs, c.head_hidden), \
        e(c.num_outputs)
    act = T.ACTIVATIONS[c.activation]
    mean = e(B, Tn, dt=f32)
    hpre = e(B, c.head_hidden, dt=f32)
    flat = e(10_000_000, dt=f32)
    launches = [
        T.patch_embed_fwd_launch(x, w, bias, pos, extra, we, be, ph, pw, t),
        T.attention_fwd_launch(t, lnw, lnb, wq, bq, wq, bq, wq, bq, wo, b2, H, c.ln_eps, attn_outs),
        T.mlp_head_fwd_launch(t, lnw, lnb, w1, b1, w2, b2, hw1, hb1, hw2, hb2, c.ln_eps, c.mlp_residual, act,
                              (t, mean, mean, hpre, e(B, c.num_outputs))),
        T.mlp_head_bwd_launch(e(B, c.num_outputs), None, t, t, lnw, lnb, w1, b1, w2, mean, mean, hw1, hw2, hpre,
                              c.mlp_residual, act, t, e(B, Tn * D, dt=f32), hpre, flat),
        T.attention_bwd_launch(t, t, lnw, lnb, wq, wq, wq, wo, mean, mean, *attn_outs[3:], H, t,
                               (attn_outs[3], attn_outs[7], attn_outs[3], attn_outs[3], attn_outs[3]), flat),
        T.patch_embed_bwd_launch(x, w, extra, we, t, ph, pw, x, extra if extra is not None else x, flat),
    ]
    return launches


def _config_key(launch: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(launch.meta.items()))


def triton_rows(archs: Iterable[int] = DEFAULT_ARCHS, dtypes: Iterable[str] = DEFAULT_DTYPES,
                presets: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Compile every distinct Triton kernel configuration of the presets, in this process."""
    from .exit_presets import list_presets

    rows, seen = [], {}
    for preset in presets or list_presets():
        for dtype_name in dtypes:
            if dtype_name not in DTYPE_VARIANTS:
                raise ValueError(f"unknown dtype {dtype_name!r}; valid: {DTYPE_VARIANTS}")
            from .ops import triton_launch

            dtype = getattr(torch, dtype_name.split("-")[0])
            saved = torch.get_float32_matmul_precision(), triton_launch.FP32_EXACT_GPU_PRECISION
            torch.set_float32_matmul_precision("high" if dtype_name.endswith("-tf32") else "highest")
            if dtype_name.endswith("-ieee"):
                triton_launch.FP32_EXACT_GPU_PRECISION = "ieee"
            try:
                launches = preset_launches(preset, dtype)
            finally:
                torch.set_float32_matmul_precision(saved[0])
                triton_launch.FP32_EXACT_GPU_PRECISION = saved[1]
            for launch in launches:
                for arch in archs:
                    key = (launch.kernel.__name__, _config_key(launch), dtype_name, arch)
                    if key in seen:
                        seen[key]["presets"].append(preset)
                        continue
                    row = dict(family="triton", kernel=launch.kernel.__name__, config=_config_key(launch),
                               dtype=dtype_name, arch=f"sm_{arch}", num_warps=launch.num_warps, presets=[preset],
                               ok=True, error="")
                    try:
                        row.update(compile_launch(launch, arch))
                        row["matmul_stage"] = row["dot_ops"] > 0 or row["kernel"] in TRITON_MATMUL_KERNELS
                    except Exception as exc:  # report, don't stop: one bad config must not hide the others
                        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
                    seen[key] = row
                    rows.append(row)
    return rows


# The Triton part when this process cannot compile (interpreter): a fresh interpreter without
# TRITON_INTERPRET computes the rows and prints them as JSON.
_SUBPROCESS = ("import json, sys; from slvit_fast.gpu_report import triton_rows; "
               "print(json.dumps(triton_rows(*json.loads(sys.argv[1]))))")


def report_rows(archs: Iterable[int] = DEFAULT_ARCHS, dtypes: Iterable[str] = DEFAULT_DTYPES,
                presets: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """All rows: Triton (in a subprocess when this process runs the interpreter) plus registered providers."""
    archs, dtypes = tuple(archs), tuple(dtypes)
    presets = tuple(presets) if presets else None
    from .ops.triton_launch import interpreted

    if interpreted():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-c", _SUBPROCESS, json.dumps([archs, dtypes, presets])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"gpu report subprocess failed ({proc.returncode}): {proc.stderr[-3000:]}")
        rows = json.loads(proc.stdout)
    else:
        rows = triton_rows(archs, dtypes, presets)
    for family, provider in _PROVIDERS.items():
        rows += provider(archs)
    for row in rows:
        annotate(row)
    return rows


def annotate(row: dict[str, Any]) -> dict[str, Any]:
    """Add theoretical occupancy (if the provider did not) and apply the tensor-core rule to one row."""
    if not row.get("ok") or row.get("registers") is None:
        return row
    if "blocks_per_sm" not in row and row.get("threads_per_block"):
        # Triton raises a kernel's dynamic shared memory limit itself when it needs more than 48 KB
        occ = occupancy(row["arch"], row["threads_per_block"], row["registers"], row.get("shared_bytes", 0),
                        smem_optin=row["family"] == "triton")
        row.update(blocks_per_sm=occ["blocks_per_sm"], warps_per_sm=occ["warps_per_sm"],
                   occupancy=occ["occupancy"], occupancy_limiter=occ["limiter"])
    required = row.get("tensor_core_required")
    if required is None:
        required = bool(row.get("matmul_stage")) and row["dtype"] in TENSOR_CORE_DTYPES
        row["tensor_core_required"] = required
    count = row.get("tensor_core_instructions")
    if required and not count:
        row["ok"] = False
        why = ("0 tensor-core instructions (HMMA/HGMMA/...) in its SASS" if count == 0
               else "its SASS was not inspected (no tensor-core count)")
        row["error"] = (f"{row['dtype']} kernel with a matmul stage has {why}: its GEMMs would run on the "
                        f"FMA units")
    elif "blocks_per_sm" in row and row["blocks_per_sm"] == 0:
        row["ok"] = False
        row["error"] = "theoretical occupancy is 0 blocks per SM: this kernel cannot launch with its resources"
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per row: resources, tensor-core instruction count (``tc``; ``-`` when not required and
    none), blocks / warps per SM and the binding limit; failed rows say why."""
    lines = [f"{'family':<7} {'kernel':<24} {'dtype':<13} {'arch':<6} {'regs':>4} {'shared':>7} {'spill':>6} "
             f"{'tc':>5} {'blk/SM':>6} {'warps':>5} {'limit':<8} {'ok':<3} presets"]
    for r in rows:
        presets = ",".join(r.get("presets", []))
        if len(presets) > 60:
            presets = presets[:57] + "..."
        head = f"{r['family']:<7} {r['kernel']:<24} {r['dtype']:<13} {r['arch']:<6}"
        if r.get("registers") is None:  # did not compile
            lines.append(f"{head} FAILED: {r.get('error', '')[:200]}")
            continue
        tc = r.get("tensor_core_instructions")
        tc_text = "?" if tc is None else str(tc)
        limiter = {"registers": "regs", "shared_memory": "smem"}.get(r.get("occupancy_limiter"),
                                                                     r.get("occupancy_limiter") or "-")
        line = (f"{head} {r['registers']:>4} {r['shared_bytes']:>7} {r['spill_bytes']:>6} {tc_text:>5} "
                f"{r.get('blocks_per_sm', '-'):>6} {r.get('warps_per_sm', '-'):>5} {limiter:<8} ")
        lines.append(line + (f"yes {presets}" if r.get("ok") else f"NO  FAILED: {r.get('error', '')[:200]}"))
    ok = [r for r in rows if r.get("ok")]
    compiled = [r for r in rows if r.get("registers") is not None]
    spills = sum(r["spill_bytes"] for r in compiled)
    spilling = sum(1 for r in compiled if r["spill_bytes"])
    no_tc = sum(1 for r in compiled if r.get("tensor_core_required") and not r.get("tensor_core_instructions"))
    lines.append(f"{len(compiled)}/{len(rows)} kernel configurations compiled; {spilling} of them spill "
                 f"(stack+local bytes, total {spills}); {no_tc} half/TF32 GEMM kernels without tensor-core "
                 f"instructions; {len(ok)}/{len(rows)} rows ok")
    return "\n".join(lines)
