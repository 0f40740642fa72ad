"""The work splits the CPU training kernels are checked under, shared by the training test files.

A split is (threads, samples per chunk (None = default), AVX2 kernels of the ATen path (None = default),
training path (None = default: fused on the auto ISA's tiles; "avx2" / "avx512" = fused on those tiles;
"off" = the ATen/BLAS path, ``SLVIT_FAST_CPU_TRAIN_FUSED=0``)); the fixture sets them for one test and
restores the thread count afterwards. An "avx512" split is skipped on CPUs without AVX-512.
"""

from __future__ import annotations

import pytest
import torch

from slvit_fast.backends import cpu_backend


def _has_avx512() -> bool:
    try:
        return cpu_backend.fused_isa() == "avx512"
    except Exception:
        return False


def _split_id(split) -> str:
    t, c, k, path = (tuple(split) + (None,))[:4]
    return f"{t}threads-chunk{c or 'auto'}-kernels{k or 'default'}-train{path or 'fused'}"


def split_fixture(splits):
    """A pytest fixture parametrized over ``splits`` that applies each one (env knobs of csrc/cpu/slvit_cpu.cpp)."""

    @pytest.fixture(params=splits, ids=[_split_id(s) for s in splits])
    def split(request, monkeypatch):
        threads, chunk, kernels, path = (tuple(request.param) + (None,))[:4]
        if chunk is not None:
            monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_CHUNK", str(chunk))
        if kernels is not None:  # which AVX2 kernels the ATen/BLAS training path runs (slvit_cpu.cpp, train_kernel)
            monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_KERNELS", kernels)
        if path == "off":
            monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_FUSED", "0")
        elif path is not None:
            if path == "avx512" and not _has_avx512():
                pytest.skip("this CPU (or OS) has no AVX-512F/DQ/BW/VL")
            monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_FUSED", "1")
            monkeypatch.setenv("SLVIT_FAST_CPU_ISA", path)
        n = torch.get_num_threads()
        torch.set_num_threads(threads)
        yield request.param
        torch.set_num_threads(n)

    return split
