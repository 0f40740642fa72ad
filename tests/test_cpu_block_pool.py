"""The feature-map gradient dx of backend "cpu"'s training backward comes from the training path's cache of
freed blocks (csrc/cpu/block_pool.cpp, shared with the saved activations): glibc maps every allocation above its mmap threshold (at most 32 MiB) afresh,
so a large dx used to cost a page fault per 4 KiB every step. Checked here: dx keeps x's layout and is
right while an earlier step's dx is still alive (no block handed out twice), and a step with a 40 MB dx
no longer faults its pages in again (on the old code every step faulted all of them in), and the cache's
bound holds for dx and the saved activations together.
"""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys

import pytest
import torch

from kernel_cases import SMALL_HIDDEN, TOLERANCES, assert_paired_close, randomize_
from slvit_fast import SLViTConfig, SLViTExit
from slvit_fast.backends import cpu_backend

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}")


def _dx(m: SLViTExit, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    m(x).backward(grad_out.to(x.dtype))
    return x.grad


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_dx_values_and_layout_with_earlier_dx_alive(layout):
    config = SLViTConfig(in_channels=5, feature_size=(12, 12), patch_size=4, embed_dim=16, num_heads=2, key_dim=8,
                         **SMALL_HIDDEN)
    base = randomize_(SLViTExit(config, backend="torch").double(), 0).train()
    ours = copy.deepcopy(base).float()
    ours.backend = "cpu"
    ref32 = copy.deepcopy(base).float()
    g = torch.Generator().manual_seed(1)
    kept = []
    for step in range(3):
        x = torch.randn(3, 5, 12, 12, generator=g, dtype=torch.float64)
        grad_out = torch.randn(3, config.num_outputs, generator=g, dtype=torch.float64)
        x32 = x.float()
        if layout == "channels_last":
            x32 = x32.contiguous(memory_format=torch.channels_last)
        elif layout == "channel_slice":
            big = torch.zeros(3, 8, 12, 12)
            big[:, 2:7] = x32
            x32 = big[:, 2:7]
        dx = _dx(ours, x32, grad_out)
        if layout == "channels_last":
            assert dx.stride() == x32.stride(), f"dx strides {dx.stride()} != x strides {x32.stride()}"
        assert_paired_close(f"dx step {step}", dx, _dx(ref32, x.float(), grad_out), _dx(base, x, grad_out),
                            TOLERANCES[torch.float32])
        kept.append((dx, dx.clone()))
    for dx, copy_ in kept:  # a later step must not have written into an earlier step's (live) dx
        assert torch.equal(dx, copy_)


def _malloc_replaced() -> str | None:
    """The name of a preloaded allocator (ASan, jemalloc, tcmalloc, mimalloc) if one is mapped: the page-fault
    count below is a statement about glibc malloc's mmap threshold and means nothing under another allocator."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return "no /proc/self/maps"
    for name in ("libasan", "libjemalloc", "libtcmalloc", "libmimalloc"):
        if name in maps:
            return name
    return None


_FAULT_PROBE = r"""
import json, resource, torch
from slvit_fast import SLViTConfig, SLViTExit
torch.manual_seed(0)
config = SLViTConfig(in_channels=160, feature_size=(64, 64), patch_size=4, embed_dim=16, num_heads=1, key_dim=8,
                     mlp_dim=64, head_hidden=40, num_outputs=7)
m = SLViTExit(config, backend="cpu").train()
x = torch.randn(16, 160, 64, 64, requires_grad=True)
faults = []
for _ in range(6):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    m(x).sum().backward()
    x.grad = None
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps(faults))
"""


@pytest.mark.skipif(_malloc_replaced() is not None, reason=f"allocator replaced ({_malloc_replaced()}): "
                    "the fault count assumes glibc malloc")
def test_large_dx_is_not_faulted_in_every_step():
    # x (and dx) 40 MiB: above glibc's largest mmap threshold; a tiny exit so the step is quick; 256 tokens
    # per sample make the training chunks one sample each, so no other buffer of the step is that large.
    # A fresh process: earlier tests' blocks in the (bounded) cache and their heap must not decide the count.
    dx_pages = 16 * 160 * 64 * 64 * 4 // 4096
    out = subprocess.run([sys.executable, "-c", _FAULT_PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    faults = json.loads(out.stdout.strip().splitlines()[-1])
    assert min(faults[1:]) < dx_pages // 4, (
        f"minor page faults per step {faults} (dx is {dx_pages} pages): dx is mapped afresh every step")


_BOUND_PROBE = r"""
import json, torch
from slvit_fast import SLViTConfig, SLViTExit, _C_cpu
torch.manual_seed(0)
config = SLViTConfig(in_channels=32, feature_size=(32, 32), patch_size=4, embed_dim=16, num_heads=2, key_dim=8,
                     mlp_dim=32, head_hidden=16, num_outputs=3)
m = SLViTExit(config, backend="cpu").train()
held = []
for batch in [9, 13, 9, 17, 5, 13, 17, 9, 21, 5]:  # varying sizes: blocks of many byte sizes are freed
    x = torch.randn(batch, 32, 32, 32, requires_grad=True)
    m(x).sum().backward()
    x.grad = None
    held.append(_C_cpu._train_pool_bytes())
print(json.dumps(held))
"""


def test_one_bound_for_saved_activations_and_dx():
    """SLVIT_FAST_CPU_TRAIN_POOL_MB bounds the free blocks of both uses together (dx here is 0.6-2.8 MB,
    each step's saved activations a few MB more): a cache per use kept up to twice the bound."""
    env = {**__import__("os").environ, "SLVIT_FAST_CPU_TRAIN_POOL_MB": "3"}
    out = subprocess.run([sys.executable, "-c", _BOUND_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    held = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(held) <= 3 << 20, f"bytes cached after each step {held} exceed the 3 MB bound"
    assert max(held) > 1 << 20, f"bytes cached after each step {held}: the cache kept (almost) nothing"
