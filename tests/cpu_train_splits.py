"""The work splits the CPU training kernels are checked under, shared by the training test files.

A split is (threads, samples per chunk (None = default), AVX2 training kernels (None = default)); the
fixture sets them for one test and restores the thread count afterwards.
"""

from __future__ import annotations

import pytest
import torch


def split_fixture(splits):
    """A pytest fixture parametrized over ``splits`` that applies each one (env knobs of csrc/cpu/slvit_cpu.cpp)."""

    @pytest.fixture(params=splits, ids=[f"{t}threads-chunk{c or 'auto'}-kernels{k or 'default'}" for t, c, k in splits])
    def split(request, monkeypatch):
        threads, chunk, kernels = request.param
        if chunk is not None:
            monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_CHUNK", str(chunk))
        if kernels is not None:  # which AVX2 training kernels run (slvit_cpu.cpp, train_kernel)
            monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_KERNELS", kernels)
        n = torch.get_num_threads()
        torch.set_num_threads(threads)
        yield request.param
        torch.set_num_threads(n)

    return split
