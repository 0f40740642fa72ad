"""The compiled extensions: loading them, and reporting what was compiled for which GPU architectures.

Three independent extension modules (see ``csrc/native_build.py``):

====================  ==============  ===================================================================
module                backend         contents
====================  ==============  ===================================================================
``slvit_fast._C_cpu``  ``"cpu"``       fused C++ CPU forward/backward (``slvit_fast::cpu_exit_*`` ops)
``slvit_fast._C_emu``  ``"cuda-emu"``  the CUDA kernel sources compiled as host C++ under the SIMT
                                      emulation header (``slvit_fast::emu_*`` ops); a test backend
``slvit_fast._C_cuda`` ``"cuda"``      the CUDA kernels (``slvit_fast::cuda_*`` ops), built by nvcc
====================  ==============  ===================================================================

Importing a module registers its ops with ``torch.library``; :func:`load` does that once and remembers
why a module could not be imported (not built, or broken), so backends can report a reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import threading
from types import ModuleType
from typing import Any

MODULES = {"cpu": "slvit_fast._C_cpu", "emu": "slvit_fast._C_emu", "cuda": "slvit_fast._C_cuda"}

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}


def load(kind: str) -> ModuleType | None:
    """Import the extension ``kind`` ('cpu', 'emu' or 'cuda') once; None (with a reason) if impossible."""
    if kind in _loaded:
        return _loaded[kind]
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _errors:
            return None
        name = MODULES[kind]
        try:
            import torch  # noqa: F401  (the extensions link against libtorch; load it first)

            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                _errors[kind] = (f"extension {name} was not built (rebuild with `pip install --no-build-isolation "
                                 f"-e .`; see csrc/native_build.py for when it is skipped)")
            else:
                _errors[kind] = f"import of {name} failed: {e}"
            return None
        except Exception as e:  # noqa: BLE001  (a broken build is a reason, not a crash)
            _errors[kind] = f"import of {name} failed: {type(e).__name__}: {e}"
            return None
        _loaded[kind] = mod
        return mod


def load_error(kind: str) -> str | None:
    """Why :func:`load` returned None for ``kind`` (None if it loaded or was not tried)."""
    return _errors.get(kind)


def _module_file(kind: str) -> str | None:
    spec = importlib.util.find_spec(MODULES[kind]) if _package_present() else None
    return spec.origin if spec is not None else None


def _package_present() -> bool:
    import importlib.util

    return importlib.util.find_spec("slvit_fast") is not None


def cuobjdump() -> str | None:
    """The cuobjdump binary used for every resource report (Triton cubins and the CUDA extension).

    Triton's own first: it matches the ptxas that builds Triton's cubins and is at least as new as the
    toolkit's here (a newer cuobjdump reads older cubins, not the reverse); then $CUDA_HOME's, then PATH.
    """
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except Exception:  # noqa: BLE001  (no or broken triton: fall through to the toolkit)
        pass
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")):
        if cand and os.path.exists(cand):
            return cand
    return None


def compiled_cuda_archs() -> list[str]:
    """GPU architectures the CUDA extension holds code for, e.g. ['sm_80', 'sm_90'] ([] if not built)."""
    path = _module_file("cuda")
    if path is None:
        return []
    tool = cuobjdump()
    if tool is None:
        return []
    r = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True)
    archs = sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", r.stdout)))
    return archs


def build_info() -> dict[str, Any]:
    """What was compiled and what is usable here: {kind: {compiled, loadable, reason, ...}}."""
    import torch

    out: dict[str, Any] = {}
    for kind in MODULES:
        compiled = _module_file(kind) is not None
        mod = load(kind) if compiled else None
        entry: dict[str, Any] = {"compiled": compiled, "loadable": mod is not None}
        if not compiled:
            entry["reason"] = "not built"
        elif mod is None:
            entry["reason"] = load_error(kind)
        if kind == "cuda":
            entry["archs"] = compiled_cuda_archs() if compiled else []
            entry["usable_here"] = bool(mod is not None and torch.cuda.is_available())
            if mod is not None and not torch.cuda.is_available():
                entry["reason"] = "compiled, but no CUDA device is available on this machine"
        else:
            entry["usable_here"] = mod is not None
        out[kind] = entry
    return out


def cuda_kernel_resources(path: str | None = None) -> list[dict[str, Any]]:
    """Per-kernel resource usage of the compiled CUDA extension, from ``cuobjdump -res-usage``.

    Rows: {"kernel", "arch", "registers", "shared_bytes", "local_bytes" (spill/stack), "constant_bytes"}.
    ``path`` defaults to the installed ``slvit_fast._C_cuda``; [] when it is not built or no cuobjdump.
    Used by ``slvit-fast gpu-report`` and ``slvit-fast info``.
    """
    path = path or _module_file("cuda")
    tool = cuobjdump()
    if path is None or tool is None:
        return []
    r = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True)
    return parse_res_usage(r.stdout)


def parse_res_usage(text: str) -> list[dict[str, Any]]:
    """Parse ``cuobjdump -res-usage`` output (also accepts ``nvcc --resource-usage`` ptxas lines): one row
    per (kernel, arch). The one parser of the package (gpu_report reads Triton cubins with it too)."""
    rows: list[dict[str, Any]] = []
    arch = None
    kernel = None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)  # ptxas -v style
        if m:
            kernel, arch = m.group(1), m.group(2)
        m = re.search(r"Function ([^\s:]+):", line)
        if m:
            kernel = m.group(1)
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", line)
        if m and kernel:
            reg, stack, shared, local = (int(v) for v in m.groups())
            mc = re.search(r"CONSTANT\[0\]:(\d+)", line)
            const = int(mc.group(1)) if mc else 0
            rows.append({"kernel": _demangle(kernel), "mangled": kernel, "arch": arch, "registers": reg,
                         "stack_bytes": stack, "shared_bytes": shared, "local_bytes": local,
                         "constant_bytes": const, "spill_bytes": local})
            kernel = None
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel and "ptxas info" in line:
            # ptxas prints "N bytes smem" only when the kernel has static shared memory
            ms = re.search(r"(\d+) bytes smem", line)
            rows.append({"kernel": _demangle(kernel), "mangled": kernel, "arch": arch,
                         "registers": int(m.group(1)), "shared_bytes": int(ms.group(1)) if ms else 0})
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and kernel:
            pending = {"kernel": _demangle(kernel), "mangled": kernel, "arch": arch,
                       "stack_bytes": int(m.group(1)),
                       "spill_bytes": int(m.group(2)) + int(m.group(3))}
            rows.append(pending)
    return _merge_ptxas_rows(rows)


def _merge_ptxas_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["mangled"], r["arch"])
        merged.setdefault(key, {}).update(r)
    return list(merged.values())


def _demangle(name: str) -> str:
    exe = shutil.which("c++filt")
    if exe is None or not name.startswith("_Z"):
        return name
    r = subprocess.run([exe, name], capture_output=True, text=True)
    return r.stdout.strip() or name


# Tensor-core instruction mnemonics in SASS (the opcode before the first '.'): warp-level MMA on
# sm_70-sm_89 (HMMA half/bf16/TF32, IMMA int8/int4, DMMA fp64, BMMA binary, QMMA fp8), warpgroup MMA on
# sm_90 (HGMMA, IGMMA, QGMMA, BGMMA) and tcgen05 MMA on sm_100 (UTC*MMA). Not counted: HFMA2.MMA (an FMA
# issued on the MMA pipe, not a tensor-core op).
TENSOR_CORE_OPCODES = frozenset({"HMMA", "IMMA", "DMMA", "BMMA", "QMMA", "OMMA", "HGMMA", "IGMMA", "QGMMA",
                                 "BGMMA", "UTCHMMA", "UTCIMMA", "UTCQMMA", "UTCOMMA", "UTCMMA"})
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[\w.]+)?\b")


def parse_sass_tensor_core(text: str) -> list[dict[str, Any]]:
    """Count tensor-core instructions per (kernel, arch) in ``cuobjdump -sass`` output.

    Rows: {"kernel" (demangled), "mangled", "arch", "tensor_core_instructions", "tensor_core_ops":
    {opcode: count}, "instructions"} - one per function, also those with no tensor-core instruction."""
    rows: dict[tuple, dict[str, Any]] = {}
    arch = kernel = None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+a?)|code for (sm_\d+a?)", line)  # fatbin / bare cubin headers
        if m:
            arch = m.group(1) or m.group(2)
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            kernel = m.group(1)
            rows[(kernel, arch)] = {"mangled": kernel, "arch": arch, "tensor_core_instructions": 0,
                                    "tensor_core_ops": {}, "instructions": 0}
            continue
        m = _SASS_LINE.match(line)
        if m and kernel is not None:
            row = rows[(kernel, arch)]
            row["instructions"] += 1
            op = m.group(1)
            if op in TENSOR_CORE_OPCODES:
                row["tensor_core_instructions"] += 1
                row["tensor_core_ops"][op] = row["tensor_core_ops"].get(op, 0) + 1
    out = list(rows.values())
    for r in out:
        r["kernel"] = _demangle(r["mangled"])
    return out


def sass_tensor_core_counts(path: str) -> list[dict[str, Any]]:
    """:func:`parse_sass_tensor_core` of ``cuobjdump -sass <path>`` (a cubin, object file or extension)."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (expected in triton/backends/nvidia/bin or $CUDA_HOME/bin)")
    r = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {path} failed: {r.stderr[-2000:]}")
    return parse_sass_tensor_core(r.stdout)


_DTYPES = {"float": "float32", "__half": "float16", "__nv_bfloat16": "bfloat16"}


def _nvcc_objects(tmp: str, archs, nvcc: str | None = None) -> tuple[list[str], str]:
    """Compile csrc/cuda/*.cu into object files in ``tmp`` (source tree only; no GPU needed).

    Returns (object paths, the ``--resource-usage`` text of ptxas)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src_dir = os.path.join(root, "csrc", "cuda")
    nvcc = nvcc or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.isdir(src_dir) or not os.path.exists(nvcc):
        return [], ""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    objects, text = [], ""
    for src in ("slvit_kernels.cu", "slvit_backward.cu"):
        obj = os.path.join(tmp, src + ".o")
        r = subprocess.run([nvcc, "-std=c++20", "-O3", "--resource-usage", *gencode, "-I", src_dir, "-c",
                            os.path.join(src_dir, src), "-o", obj], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src}: {r.stderr[-2000:]}")
        objects.append(obj)
        text += r.stdout + r.stderr
    return objects, text


def nvcc_resource_usage(archs=(80, 90), nvcc: str | None = None) -> list[dict[str, Any]]:
    """Compile csrc/cuda/*.cu with ``nvcc --resource-usage`` (source tree only; no GPU needed)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _, text = _nvcc_objects(tmp, archs, nvcc)
    return parse_res_usage(text)


# Launch geometry of the CUDA C++ kernels, mirrored from csrc/cuda (tests/test_gpu_report_tc.py checks
# these constants against the sources): every kernel runs kThreads threads per block; dynamic shared
# memory is encoder_smem / head_smem of slvit_kernels.cu (the backward uses none).
CUDA_THREADS = 256  # slvit_kernels.cuh kThreads
CUDA_HEAD_ROWS = 16  # slvit_kernels.cu kHeadRows: samples per head block on tensor cores
CUDA_SMEM_LIMIT = 48 * 1024  # the kernels never opt in to more dynamic shared memory


def cuda_dynamic_smem(kernel: str, config: Any, tensor_cores: bool) -> int:
    """Dynamic shared memory (bytes) of one CUDA C++ kernel launch for an exit ``config``
    (an :class:`~slvit_fast.config.SLViTConfig`); ``tensor_cores`` is the kernel's GEMM mode
    (fp16/bf16, or fp32 with TF32 allowed)."""
    if kernel == "encoder":  # one score row of T floats per warp
        return 4 * (CUDA_THREADS // 32) * config.num_tokens
    if kernel == "head":  # the block's samples' hidden rows
        rows = CUDA_HEAD_ROWS if tensor_cores and 4 * CUDA_HEAD_ROWS * config.head_hidden <= CUDA_SMEM_LIMIT else 1
        return 4 * rows * config.head_hidden
    if kernel == "backward":
        return 0
    raise ValueError(f"unknown CUDA kernel {kernel!r}")


def _cuda_occupancy(kernel: str, dtype: str, arch: str, registers: int, static_smem: int) -> dict[str, Any]:
    """Worst theoretical occupancy of a CUDA C++ kernel over every preset (and, for float32, both GEMM
    modes: exact SIMT and TF32), with the preset that gives it. ``static_smem`` is cuobjdump's SHARED,
    which on sm_90 includes 1 KB ptxas reserves in kernels using dynamic shared memory: counted on top
    of the driver's reserved 1 KB (conservative: occupancy may be understated, never overstated)."""
    from .config import SLViTConfig
    from .exit_presets import PRESETS, get_preset
    from .occupancy import occupancy

    worst = None
    for name in PRESETS:
        config = SLViTConfig(**get_preset(name).slvit_kwargs())
        for tc in ((False, True) if dtype == "float32" else (True,)):
            dyn = cuda_dynamic_smem(kernel, config, tc)
            occ = occupancy(arch, CUDA_THREADS, registers, static_smem + dyn)
            # fewest warps; among equals, the largest shared memory (the launch closest to a limit)
            if worst is None or (occ["warps_per_sm"], -dyn) < (worst[0]["warps_per_sm"], -worst[1]):
                worst = (occ, dyn, name)
    occ, dyn, name = worst
    return {"threads_per_block": CUDA_THREADS, "dynamic_shared_bytes": dyn, "blocks_per_sm": occ["blocks_per_sm"],
            "warps_per_sm": occ["warps_per_sm"], "occupancy": occ["occupancy"], "occupancy_limiter": occ["limiter"],
            "occupancy_preset": name}


def gpu_report_rows(archs=(80, 90)) -> list[dict[str, Any]]:
    """CUDA C++ kernel rows for ``slvit-fast gpu-report`` (``gpu_report.register_provider("cuda", ...)``).

    From the built extension (cuobjdump) when it holds every requested arch, else by compiling the
    sources with nvcc. The kernels are shape-generic (sizes are runtime arguments), so one row per
    kernel x dtype x arch covers every preset; its occupancy is the worst over the presets. Each row
    carries ``tensor_core_instructions`` (SASS HMMA/HGMMA/... count) and ``tensor_core_required``: every
    kernel has GEMM stages, and the float32 kernel is also the TF32 kernel (a runtime flag selects
    TF32 tensor cores when torch's float32 matmul precision is not "highest"), so all need tensor cores.
    """
    import tempfile

    from .exit_presets import PRESETS

    wanted = {f"sm_{a}" for a in archs}
    raw, sass, source = [], [], "built extension"
    if build_info_cuda_compiled():
        raw = cuda_kernel_resources()
        if raw and wanted <= {r["arch"] for r in raw}:
            sass = sass_tensor_core_counts(_module_file("cuda"))
        else:
            raw = []
    if not raw:
        source = "nvcc (csrc/cuda)"
        with tempfile.TemporaryDirectory() as tmp:
            objects, _ = _nvcc_objects(tmp, archs)
            for obj in objects:  # the same cuobjdump reports as for the built extension
                raw += cuda_kernel_resources(obj)
                sass += sass_tensor_core_counts(obj)
    tc = {(r["mangled"], r["arch"]): r for r in sass}
    rows = []
    for r in raw:
        m = re.match(r"void slvit::slvit_(\w+)_kernel<([\w:]+)>", r["kernel"])
        if not m or r["arch"] not in wanted:
            continue
        kernel, dtype = m.group(1), _DTYPES.get(m.group(2), m.group(2))
        stack, local = r.get("stack_bytes", 0), r.get("local_bytes", r.get("spill_bytes", 0))
        counts = tc.get((r["mangled"], r["arch"]))
        row = {"family": "cuda", "kernel": kernel, "config": "runtime shapes (all presets)",
               "dtype": dtype, "arch": r["arch"],
               "registers": r.get("registers", 0), "shared_bytes": r.get("shared_bytes", 0),
               "local_bytes": local, "stack_bytes": stack, "spill_bytes": stack + local,
               "presets": list(PRESETS), "ok": True, "error": "", "source": source,
               "matmul_stage": True, "tensor_core_required": True,
               "tensor_core_instructions": counts["tensor_core_instructions"] if counts else None,
               "tensor_core_ops": counts["tensor_core_ops"] if counts else {}}
        if dtype == "float32":
            row["precision"] = "fp32: exact SIMT at 'highest', TF32 tensor cores otherwise (runtime flag)"
        row.update(_cuda_occupancy(kernel, dtype, r["arch"], row["registers"], row["shared_bytes"]))
        rows.append(row)
    return rows


def build_info_cuda_compiled() -> bool:
    return _module_file("cuda") is not None


__all__ = ["MODULES", "gpu_report_rows", "nvcc_resource_usage", "parse_sass_tensor_core", "sass_tensor_core_counts",
           "cuda_dynamic_smem", "TENSOR_CORE_OPCODES", "load", "load_error", "build_info", "compiled_cuda_archs", "cuda_kernel_resources",
           "parse_res_usage"]
