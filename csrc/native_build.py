"""Decides which native extensions setup.py builds; prints why one is skipped.

Kept out of setup.py so the decision logic stays readable and testable. Three independent extension
modules, so a failed or impossible CUDA build never loses the CPU one:

- ``slvit_fast._C_cpu``  fused C++ CPU kernels (backend "cpu"); built whenever a C++ compiler exists.
- ``slvit_fast._C_emu``  the CUDA kernel sources (csrc/cuda/*.cu) compiled as host C++ under the SIMT
  emulation header csrc/emu/simt_emu.h (backend "cuda-emu", a test backend); needs C++20 and the
  CUDA headers (cuda_fp16.h / cuda_bf16.h; only headers, no GPU and no nvcc).
- ``slvit_fast._C_cuda`` the real CUDA extension (backend "cuda"); built when torch is a CUDA build
  and nvcc is found (``CUDA_HOME``). Architectures: ``TORCH_CUDA_ARCH_LIST`` if set, else sm_80 and
  sm_90 (``DEFAULT_ARCHS``). No GPU is needed to compile.

Environment: ``SLVIT_FAST_SKIP_NATIVE=1`` skips everything (pure-Python install);
``SLVIT_FAST_SKIP_CUDA=1`` skips only the CUDA extension; ``SLVIT_FAST_SKIP_EMU=1`` skips the
emulation build; ``SLVIT_FAST_SKIP_CPU=1`` skips only the CPU extension (rebuilding the CUDA/emulator
extensions in place leaves an existing _C_cpu untouched).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile

SKIP_ENV = "SLVIT_FAST_SKIP_NATIVE"
SKIP_CUDA_ENV = "SLVIT_FAST_SKIP_CUDA"
SKIP_EMU_ENV = "SLVIT_FAST_SKIP_EMU"
SKIP_CPU_ENV = "SLVIT_FAST_SKIP_CPU"
DEFAULT_ARCHS = "8.0;9.0"

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _say(msg: str) -> None:
    print(f"slvit_fast setup: {msg}", file=sys.stderr)


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _rel(*parts: str) -> str:
    # setuptools wants source paths relative to setup.py
    return os.path.join("csrc", *parts)


def cxx_compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


def _compiles(cxx: str, source: str, flags: list[str]) -> bool:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        r = subprocess.run([cxx, *flags, "-c", src, "-o", os.path.join(d, "probe.o")],
                           capture_output=True, text=True)
        return r.returncode == 0


def cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.isdir("/usr/local/cuda"):
        home = "/usr/local/cuda"
    return home if home and os.path.isdir(home) else None


def arch_list() -> list[str]:
    """GPU architectures the CUDA extension is compiled for, e.g. ['8.0', '9.0']."""
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCHS
    return [a for a in raw.replace(",", ";").replace(" ", ";").split(";") if a]


def _extensions() -> list:
    from torch.utils.cpp_extension import CppExtension

    exts = []
    info = {"cpu": False, "emu": False, "cuda": False, "cuda_archs": [], "skipped": {}}  # for messages
    cxx = cxx_compiler()
    if cxx is None:
        _say("no C++ compiler found (set CXX): installing pure-Python (backends 'torch' and 'triton' only)")
        info["skipped"]["cpu"] = info["skipped"]["emu"] = info["skipped"]["cuda"] = "no C++ compiler"
        return []
    common = ["-O3", "-std=c++20", "-fvisibility=hidden"]
    # train_fused_path.cpp: the fused training path (its kernels are entered only on AVX2+FMA CPUs) and the
    # saved activations' allocation both training paths use, so it is built on every machine;
    # block_pool.cpp: the training path's cache of freed blocks (saved activations, dx)
    cpu_sources = [_rel("cpu", "slvit_cpu.cpp"), _rel("cpu", "train_fused_path.cpp"), _rel("cpu", "module_cpu.cpp"),
                   _rel("cpu", "block_pool.cpp")]
    cpu_macros = []
    if platform.machine().lower() in ("x86_64", "amd64"):
        # fused AVX2/FMA inference kernels; entered only after a run-time CPU check
        cpu_sources.append(_rel("cpu", "fused_avx2.cpp"))
        # AVX-512 GEMM tiles of the same kernels; chosen at run time (SLVIT_FAST_CPU_ISA)
        cpu_sources.append(_rel("cpu", "fused_avx512.cpp"))
        # AVX-512 patch embedding straight from the image rows (no patch gather)
        cpu_sources.append(_rel("cpu", "patch_embed_avx512.cpp"))
        # kernels of the fused training path (attention per chunk between GEMMs on the same tiles)
        cpu_sources.append(_rel("cpu", "fused_train.cpp"))
        # vector patch gather / scatter of the training path (patch_permute in slvit_cpu.cpp)
        cpu_sources.append(_rel("cpu", "patch_rows.cpp"))
        cpu_macros.append(("SLVIT_FUSED_AVX2", "1"))
    # -fopenmp: at::parallel_for is a header template that is only parallel when the including file
    # is compiled with OpenMP; the link resolves to the libgomp.so.1 torch already loaded (same soname).
    if _flag(SKIP_CPU_ENV):
        info["skipped"]["cpu"] = f"{SKIP_CPU_ENV} is set"
    else:
        exts.append(CppExtension(
            "slvit_fast._C_cpu", cpu_sources, define_macros=cpu_macros,
            extra_compile_args={"cxx": common + ["-fopenmp"]}, extra_link_args=["-fopenmp"],
        ))
        info["cpu"] = True

    home = cuda_home()
    if _flag(SKIP_EMU_ENV):
        info["skipped"]["emu"] = f"{SKIP_EMU_ENV} is set"
    elif home is None or not os.path.exists(os.path.join(home, "include", "cuda_fp16.h")):
        info["skipped"]["emu"] = "CUDA headers (cuda_fp16.h) not found; set CUDA_HOME"
        _say("skipping the cuda-emu test backend: " + info["skipped"]["emu"])
    elif not _compiles(cxx, "#include <ucontext.h>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
                            "int main(){ucontext_t c; getcontext(&c); return (int)__half2float(__float2half(1.f));}",
                       ["-std=c++20", "-I", os.path.join(home, "include")]):
        info["skipped"]["emu"] = "the host compiler cannot build the emulator (C++20, <ucontext.h>, cuda_fp16.h)"
        _say("skipping the cuda-emu test backend: " + info["skipped"]["emu"])
    else:
        exts.append(CppExtension(
            "slvit_fast._C_emu",
            [_rel("emu", "kernels_emu.cpp"), _rel("emu", "emu_ops.cpp")],
            include_dirs=[os.path.join(home, "include"), os.path.join(HERE, "cuda"), os.path.join(HERE, "emu")],
            extra_compile_args={"cxx": ["-O2", "-std=c++20", "-fvisibility=hidden", "-pthread"]},
            extra_link_args=["-pthread"],
        ))
        info["emu"] = True

    cuda_ext = _cuda_extension(home, info)
    if cuda_ext is not None:
        exts.append(cuda_ext)
    # a source tree without some of the sources (partial checkout) builds what it can
    exts = [e for e in exts if all(os.path.exists(os.path.join(ROOT, s)) for s in e.sources)]
    _say("building native extensions: " + ", ".join(e.name for e in exts)
         + (f" (CUDA archs {info['cuda_archs']})" if info["cuda"] else "")
         + "".join(f"; skipped {k}: {v}" for k, v in info["skipped"].items()))
    return exts


def _cuda_extension(home: str | None, info: dict):
    import torch

    if _flag(SKIP_CUDA_ENV):
        info["skipped"]["cuda"] = f"{SKIP_CUDA_ENV} is set"
        return None
    if not torch.version.cuda:
        info["skipped"]["cuda"] = f"torch {torch.__version__} is not a CUDA build"
        _say("skipping the CUDA extension: " + info["skipped"]["cuda"])
        return None
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    if not nvcc or not os.path.exists(nvcc):
        info["skipped"]["cuda"] = "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
        _say("skipping the CUDA extension: " + info["skipped"]["cuda"])
        return None
    # torch.utils.cpp_extension reads CUDA_HOME at import time; make sure it sees the same toolkit.
    os.environ.setdefault("CUDA_HOME", home)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arch_list())
    from torch.utils.cpp_extension import CUDAExtension

    archs = arch_list()
    info["cuda"] = True
    info["cuda_archs"] = ["sm_" + a.replace(".", "").replace("+PTX", "") for a in archs]
    info["cuda_version"] = torch.version.cuda
    return CUDAExtension(
        "slvit_fast._C_cuda",
        [_rel("cuda", "slvit_kernels.cu"), _rel("cuda", "slvit_backward.cu"), _rel("cuda", "cuda_ops.cpp")],
        include_dirs=[os.path.join(HERE, "cuda")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fvisibility=hidden"],
                            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]},
    )


def native_build_options() -> dict:
    if _flag(SKIP_ENV):
        _say(f"{SKIP_ENV} is set: installing pure-Python (backends 'torch' and 'triton' only)")
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        _say("torch is not installed in the build environment: installing pure-Python. Install torch "
             "first and build with `pip install --no-build-isolation .` to compile the C++/CUDA backends")
        return {}
    exts = _extensions()
    if not exts:
        return {}
    return {"ext_modules": exts, "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}
