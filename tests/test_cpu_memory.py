"""Memory held by backend="cpu" inference after the output is freed (issue #12 item 6), and the chunked
ATen/BLAS inference path that bounds it.

Both inference paths keep their intermediates in a per-thread workspace reused across calls; it is
bounded by SLVIT_FAST_CPU_ARENA_MB (default 64 MB). Before the bound, one batch-4096 resnet152-b1 call
on the ATen/BLAS path (SLVIT_FAST_CPU_FUSED=0, also the automatic path without AVX2/FMA) left 5.4 GB
resident (every intermediate of the whole batch); now batches whose intermediates exceed the bound run
in chunks that fit in it. Measured here at batch 4096: 62 MB retained (ATen/BLAS), 30 MB (fused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import num_threads
from kernel_cases import awkward_config, check_against_reference, check_nan_isolated, randomize_
from slvit_fast import SLViTExit
from slvit_fast.backends import cpu_backend

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARENA_MB = 64  # the default bound of the reused inference workspace (per calling thread)
SLACK_MB = 32  # allocator noise (glibc arenas of the worker threads, ATen temporaries)

# One resnet152-b1 exit inference in a fresh process, RSS (/proc/self/statm) before and after, with the
# output freed. Batch 256 is enough: the unbounded workspace kept ~340 MB of intermediates at it.
_SCRIPT = r"""
import gc, json, os, sys
import torch
import slvit_fast

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

torch.set_num_threads(2)
m = slvit_fast.SLViTExit.from_preset("resnet152-b1", num_outputs=10).eval()
assert m.active_backend(torch.empty(1, 128, 28, 28)) == "cpu", m.active_backend(torch.empty(1, 128, 28, 28))
x = torch.randn(int(sys.argv[1]), 128, 28, 28)
with torch.no_grad():
    m(x[:2])  # library start-up (OpenMP team, BLAS) is not what is measured
gc.collect()
before = rss_mb()
retained = {}
for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
    with ctx():
        out = m(x)
    assert out.shape == (x.shape[0], 10) and torch.isfinite(out).all()
    del out
    gc.collect()
    retained[mode] = rss_mb() - before
print(json.dumps(retained))
"""


def _retained_mb(batch: int, **env) -> dict:
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(batch)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "2", **env}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fused", ["0", "1"], ids=["aten-blas", "fused"])
def test_inference_retains_bounded_memory(fused):
    if fused == "1" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the fused CPU kernels need AVX2+FMA")
    retained = _retained_mb(256, SLVIT_FAST_CPU_FUSED=fused)
    for mode, mb in retained.items():
        assert mb < ARENA_MB + SLACK_MB, (
            f"SLVIT_FAST_CPU_FUSED={fused}, {mode}: {mb:.0f} MB still resident after the output was freed "
            f"(bound {ARENA_MB} MB workspace + {SLACK_MB} MB slack)")


def test_smaller_arena_bound_is_honoured():
    retained = _retained_mb(256, SLVIT_FAST_CPU_FUSED="0", SLVIT_FAST_CPU_ARENA_MB="8")
    assert max(retained.values()) < 8 + SLACK_MB, retained


# -- the chunked ATen/BLAS inference path computes what the whole batch would ---------------------------
@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def chunked(request, monkeypatch):
    """ATen/BLAS inference with a tiny workspace bound: every sample or two is its own chunk."""
    monkeypatch.setenv("SLVIT_FAST_CPU_FUSED", "0")
    monkeypatch.setenv("SLVIT_FAST_CPU_ARENA_MB", "0.05")
    with num_threads(request.param):
        yield request.param


@pytest.mark.parametrize("name", ["N25-h1", "grid16x9-h24-extra", "N49-nores-relu"])
def test_chunked_inference_matches_reference(chunked, name):
    with torch.no_grad():
        check_against_reference("cpu", awkward_config(name), 7, torch.float32, backward=False)


def test_chunked_inference_mode_equals_one_chunk(chunked, monkeypatch):
    """Under inference_mode the workers write an inference tensor: they need the caller's mode."""
    c = awkward_config("grid16x9-h24-extra")
    m = randomize_(SLViTExit(c, backend="cpu")).eval()
    x = torch.randn(9, c.in_channels, *c.feature_size)
    e = torch.randn(9, c.extra_tokens, c.extra_dim)
    with torch.inference_mode():
        out = m(x, e)
        monkeypatch.setenv("SLVIT_FAST_CPU_ARENA_MB", "64")
        whole = m(x, e)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)


def test_chunked_inference_keeps_nan_in_its_sample(chunked):
    check_nan_isolated("cpu")


@pytest.mark.parametrize("var,value", [("SLVIT_FAST_CPU_ARENA_MB", "lots"), ("SLVIT_FAST_CPU_ARENA_MB", "-1"),
                                       ("SLVIT_FAST_CPU_FUSED", "maybe")])
def test_bad_env_values_are_clear_errors(monkeypatch, var, value):
    c = awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend="cpu")).eval()
    monkeypatch.setenv(var, value)
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError), match=var):
        m(torch.randn(2, c.in_channels, *c.feature_size))


@pytest.mark.parametrize("value,fused", [("false", False), ("No", False), (" off ", False), ("0", False),
                                         ("on", True), ("YES", True), ("", True)])
def test_fused_switch_words(monkeypatch, value, fused):
    """SLVIT_FAST_CPU_FUSED=false/no/off act like 0 in the C++ op too (not only in Python), on/yes like 1."""
    if fused and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the fused CPU kernels need AVX2+FMA")
    c = awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend="cpu")).eval()
    x = torch.randn(2, c.in_channels, *c.feature_size)
    monkeypatch.setenv("SLVIT_FAST_CPU_FUSED", value)
    with torch.no_grad(), torch.autograd.profiler.profile() as prof:
        m(x)
    assert any(e.name == "slvit_cpu::fused_forward" for e in prof.function_events) == fused
