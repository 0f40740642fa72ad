"""Token counts at the edges of the fused training path's attention kernels (csrc/cpu/fused_train.cpp).

The row softmax keeps a row in registers for T <= 64 (softmax_rows_short) and loops otherwise; K^T / V^T
are transposed in 8 x 8 register blocks with scalar row and column tails. These cases put T on each side
of those edges - 8 (one full vector), 9 (a 1-lane tail), 63, 64 (the last register row), 65 (one extra
token: the loop) - with key_dim 12 (a 4-column transpose tail), and check the output and every gradient
against the float64 reference (paired tolerance) on both GEMM tile sets and a 2-thread split.
"""

from __future__ import annotations

import pytest
import torch

from cpu_train_splits import split_fixture
from kernel_cases import SMALL_HIDDEN, check_against_reference
from slvit_fast import SLViTConfig
from slvit_fast.backends import cpu_backend

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = [
    pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}"),
    pytest.mark.skipif(not has_avx2, reason="the fused CPU training path needs AVX2+FMA"),
]

# (threads, samples per chunk, ATen-path kernels, training path): cpu_train_splits.py
split = split_fixture([(1, None, None, "avx2"), (1, None, None, "avx512"), (2, 2, None, None)])

# name: feature_size, patch 2, extra tokens -> T = (H/2)(W/2) + extra
TOKENS = {
    "T8": ((4, 8), 0),
    "T9": ((6, 6), 0),
    "T63": ((14, 18), 0),
    "T64": ((16, 16), 0),
    "T65-extra": ((16, 16), 1),
}


@pytest.mark.parametrize("name", list(TOKENS))
def test_token_counts(name, split):
    size, extra = TOKENS[name]
    config = SLViTConfig(in_channels=3, feature_size=size, patch_size=2, embed_dim=16, num_heads=3, key_dim=12,
                         extra_tokens=extra, extra_dim=5 if extra else 0, **SMALL_HIDDEN)
    check_against_reference("cpu", config, 3)
