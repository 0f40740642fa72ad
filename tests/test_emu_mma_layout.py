"""The emulator's warp-level MMA (csrc/emu/simt_emu.h) and the kernels' tensor-core GEMM (csrc/cuda/slvit_mma.cuh).

csrc/emu/mma_check_main.cpp runs block_gemm_tc - the GEMM every tensor-core stage of the exit kernels
calls - under the emulator for bf16, fp16 (m16n8k16) and TF32 (m16n8k8) on aligned and ragged shapes,
against a float64 matmul. Built as is it must pass; built with SLVIT_EMU_PLANT_MMA_BUG (two A fragment
rows swapped in the emulator's PTX layout) it must fail: the emulator's layouts are what makes the
exit tests in tests/test_cuda_emu.py / tests/test_cuda_mma.py able to catch a wrong fragment packing.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")

pytestmark = pytest.mark.skipif(
    CXX is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_fp16.h")),
    reason="needs a C++20 compiler and the CUDA headers")


def _build_and_run(tmp_path, *defines: str) -> subprocess.CompletedProcess:
    exe = tmp_path / ("mma_check" + "".join(defines))
    cmd = [CXX, "-std=c++20", "-O1", *[f"-D{d}" for d in defines], "-I", os.path.join(CUDA_HOME, "include"),
           "-I", os.path.join(ROOT, "csrc", "cuda"), "-I", os.path.join(ROOT, "csrc", "emu"),
           os.path.join(ROOT, "csrc", "emu", "mma_check_main.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)


def _errors(stdout: str) -> dict[tuple, float]:
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 5:
            rows[(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))] = float(parts[4])
    return rows


def test_tensor_core_gemm_matches_float64(tmp_path):
    r = _build_and_run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    errs = _errors(r.stdout)
    assert {k[0] for k in errs} == {"bf16", "fp16", "tf32"} and len(errs) == 15
    # errors are operand rounding only (relative to sum |a w|): bf16 ~2^-9, fp16 / tf32 ~2^-12
    assert max(v for k, v in errs.items() if k[0] == "bf16") < 1 / 128
    assert max(v for k, v in errs.items() if k[0] != "bf16") < 1 / 1024


def test_planted_wrong_fragment_layout_is_caught(tmp_path):
    r = _build_and_run(tmp_path, "SLVIT_EMU_PLANT_MMA_BUG")
    assert r.returncode == 1 and "FAILED" in r.stdout, r.stdout + r.stderr
    errs = _errors(r.stdout)
    # every dtype goes wrong by far more than rounding on every shape with a full 16-row tile (the 5x3x7
    # case only has zeros in the swapped bf16/fp16 positions: rows >= 8 and columns >= 8 are padding)
    assert len(errs) == 15 and all(v > 0.1 for k, v in errs.items() if k[1] >= 16), errs
    assert errs[("tf32", 5, 3, 7)] > 0.1
