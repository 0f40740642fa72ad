"""The fused AVX2 inference forward of backend="cpu" (csrc/cpu/fused_avx2.cpp) against the reference.

Inference (no autograd graph) takes the fused path; training takes the ATen/BLAS path that saves
activations (tests/test_cpu_backend.py). Both thread-work splits are covered: a *team* (every worker on
one small batch, split by weight rows / heads / token columns, meeting at barriers) for batch*tokens
<= 256 with several threads, and *sample ownership* (each worker its own samples in chunks) otherwise.
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import AWKWARD_CONFIGS, TOLERANCES, awkward_config, check_against_reference, randomize_
from slvit_fast import SLViTConfig, SLViTExit
from slvit_fast.backends import cpu_backend
from slvit_fast.exit_presets import PRESETS

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = [
    pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}"),
    pytest.mark.skipif(not has_avx2, reason="the fused CPU kernels need AVX2+FMA"),
]


def check_inference(config, batch, dtype=torch.float32, **kw):
    with torch.no_grad():
        return check_against_reference("cpu", config, batch, dtype, backward=False, **kw)


def fused_was_used(module, x, extra=None) -> bool:
    with torch.no_grad(), torch.autograd.profiler.profile() as prof:
        module(x, extra)
    return any(e.name == "slvit_cpu::fused_forward" for e in prof.function_events)


@pytest.mark.parametrize("name", list(AWKWARD_CONFIGS))
@pytest.mark.parametrize("batch", [1, 3, 7, 24])
def test_awkward_configs(name, batch, threads):
    check_inference(awkward_config(name), batch)


@pytest.mark.parametrize("name", ["N49-h8-kd36", "grid16x9-h24-extra", "nonsquare-patch"])
def test_channels_last(name, threads):
    check_inference(awkward_config(name), 5, channels_last=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    check_inference(awkward_config("N49-h8-kd36"), 3, dtype)


PRESETS_3 = ["resnet152-b1", "inceptionv3-b1-cifar100", "audiocsrnet-av1"]


@pytest.mark.parametrize("preset", PRESETS_3)
@pytest.mark.parametrize("batch", [1, 5])
def test_presets(preset, batch, threads):
    check_inference(SLViTConfig(**PRESETS[preset].slvit_kwargs()), batch)


def test_batch_64_two_layers(threads):
    check_inference(awkward_config("N49-nores-relu", num_layers=2), 64)


@pytest.mark.parametrize("heads", [1, 24])
def test_heads(heads):
    check_inference(awkward_config("N25-h1", num_heads=heads), 2)


@pytest.mark.parametrize("batch", [2, 40])
def test_nan_stays_in_its_sample(batch, threads):
    c = awkward_config("N49-h8-kd36")
    m = randomize_(SLViTExit(c, backend="cpu")).eval()
    ref = randomize_(SLViTExit(c, backend="torch")).eval()
    x = torch.randn(batch, c.in_channels, *c.feature_size)
    x[1, 0, 3, 4] = float("nan")
    with torch.no_grad():
        out, expected = m(x), ref(x)
    assert torch.isnan(out[1]).all()
    keep = [i for i in range(batch) if i != 1]
    assert torch.isfinite(out[keep]).all()
    torch.testing.assert_close(out[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_inference_takes_the_fused_path_and_training_does_not():
    c = awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend="cpu"))
    x = torch.randn(2, c.in_channels, *c.feature_size)
    assert fused_was_used(m, x)
    with torch.autograd.profiler.profile() as prof:
        m(x).sum().backward()
    assert not any(e.name == "slvit_cpu::fused_forward" for e in prof.function_events)


def test_generic_path_switch(monkeypatch):
    """SLVIT_FAST_CPU_FUSED=0 selects the ATen/BLAS inference path; both agree with the reference."""
    c = awkward_config("grid16x9-h24-extra")
    m = randomize_(SLViTExit(c, backend="cpu")).eval()
    x = torch.randn(3, c.in_channels, *c.feature_size)
    extra = torch.randn(3, c.extra_tokens, c.extra_dim)
    with torch.no_grad():
        fused = m(x, extra)
        monkeypatch.setenv("SLVIT_FAST_CPU_FUSED", "0")
        assert not fused_was_used(m, x, extra)
        generic = m(x, extra)
    torch.testing.assert_close(fused, generic, rtol=1e-5, atol=1e-5)
    check_inference(c, 3)  # generic path (env still set) against the reference


GENERIC_CASES = [(n, b) for n in AWKWARD_CONFIGS for b in (1, 7)] + [(p, 1) for p in PRESETS_3]


def case_config(name):
    return SLViTConfig(**PRESETS[name].slvit_kwargs()) if name in PRESETS else awkward_config(name)


@pytest.mark.parametrize("name,batch", GENERIC_CASES)
def test_generic_path_matches_reference(name, batch, threads, monkeypatch):
    """SLVIT_FAST_CPU_FUSED=0: the ATen/BLAS inference path runs (the fused kernel does not) and matches the
    reference, batch 1 (the entry point declines too) and 7, on 1 and 2 threads."""
    c = case_config(name)
    m = randomize_(SLViTExit(c, backend="cpu")).eval()
    x = torch.randn(batch, c.in_channels, *c.feature_size)
    extra = torch.randn(batch, c.extra_tokens, c.extra_dim) if c.extra_tokens else None
    assert fused_was_used(m, x, extra)  # the probe sees the fused path when it is on
    monkeypatch.setenv("SLVIT_FAST_CPU_FUSED", "0")
    assert not fused_was_used(m, x, extra)
    check_inference(c, batch)


def test_calls_with_different_shapes_reuse_the_workspace_safely(threads):
    """The per-thread workspace is reused across calls of different sizes: no stale values leak in."""
    small, big = awkward_config("N25-h1"), awkward_config("N144-h12")
    ms = randomize_(SLViTExit(small, backend="cpu")).eval()
    mb = randomize_(SLViTExit(big, backend="cpu")).eval()
    xs = torch.randn(2, small.in_channels, *small.feature_size)
    xb = torch.randn(9, big.in_channels, *big.feature_size)
    with torch.no_grad():
        first = ms(xs)
        mb(xb)
        assert torch.equal(ms(xs), first)


@pytest.mark.parametrize("patch", [(2, 2), (2, 4)])
@pytest.mark.parametrize("how", ["batch", "channels", "rows"])
def test_expanded_inputs_with_zero_strides(patch, how):
    """Broadcast (stride-0) feature maps: the gather must not use strides to mean anything else."""
    c = SLViTConfig(in_channels=3, feature_size=(4, 8), patch_size=patch, embed_dim=16, num_heads=2, mlp_dim=32,
                    head_hidden=20, num_outputs=5)
    m = randomize_(SLViTExit(c, backend="cpu")).eval()
    ref = randomize_(SLViTExit(c, backend="torch")).eval()
    x = {"batch": torch.randn(1, 3, 4, 8).expand(3, 3, 4, 8),
         "channels": torch.randn(3, 1, 4, 8).expand(3, 3, 4, 8),
         "rows": torch.randn(3, 3, 1, 8).expand(3, 3, 4, 8)}[how]
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x.contiguous()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_per_sample_results_do_not_depend_on_threads_or_chunks(isa, monkeypatch):
    """Batches past the team size are cut into chunks that workers claim from a shared counter, so which
    worker computes a sample changes from call to call: the output must be the same bits for 1, 2 and 3
    threads. (Not across batch sizes: below 4 samples the head is per-sample dot products, a GEMM above.)"""
    if isa == "avx512" and cpu_backend.fused_isa() != "avx512":
        pytest.skip("this CPU (or OS) has no AVX-512F/DQ/BW/VL")
    monkeypatch.setenv("SLVIT_FAST_CPU_ISA", isa)
    monkeypatch.setenv("SLVIT_FAST_CPU_PARALLEL_MIN_FLOPS", "0")
    c = awkward_config("N49-nores-relu")  # 49 tokens: chunks of 4 samples
    m = randomize_(SLViTExit(c, backend="cpu")).eval()
    x = torch.randn(23, c.in_channels, *c.feature_size)
    n = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = m(x)
            for threads in (2, 3, 2):
                torch.set_num_threads(threads)
                assert torch.equal(m(x), one), f"{threads} threads"
    finally:
        torch.set_num_threads(n)
