"""Patch embedding straight from the image rows (csrc/cpu/patch_embed_avx512.cpp) on the fused CPU path.

With the AVX-512 tiles, unit pixel stride, a patch width of 2, 4 or 8 and rows of more than 16 pixels,
the fused forward multiplies the NCHW rows directly (one register = 16 pixels = 16/pw patches x pw
pixel columns, the weight repacked per call) instead of gathering patch panels first; elsewhere
(pw = 16 or 5, rows of <= 16 pixels, channels_last with more than one channel, the AVX2 tiles) and
with ``SLVIT_FAST_CPU_EMBED=gather`` it keeps the panels. Both are checked against the reference over
those widths, patch heights other than the width, rows that end inside a register (20, 28, 40, 68
pixels), one channel, non-square grids, extra tokens, channel counts above one K block (the blocked
sum added into the output), batch 1 / odd / 64, 1 and 2 threads (team and per-sample splits), and the
training forward with every gradient. Strided and expanded inputs must give the bits of their
contiguous copy; where the direct kernel applies it must actually run (its sums are ordered
differently, so its bits differ from the panels'), and where it does not, auto must give the panels'
bits exactly.
"""

from __future__ import annotations

import pytest
import torch

from conftest import num_threads
from kernel_cases import SMALL_HIDDEN, check_against_reference, randomize_
from slvit_fast import SLViTConfig, SLViTExit
from slvit_fast.backends import cpu_backend

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
HAS_AVX512 = reason is None and cpu_backend.fused_isa() == "avx512"
pytestmark = pytest.mark.skipif(not HAS_AVX512, reason=f"needs the fused AVX-512 tiles ({reason or 'no AVX-512'})")

EMBED_ENV = "SLVIT_FAST_CPU_EMBED"

CONFIGS = {  # name: config kwargs; image rows of gw * pw pixels
    "pw2-20px": dict(in_channels=6, feature_size=(10, 20), patch_size=2, embed_dim=32, num_heads=2),
    "pw4-28px-C1": dict(in_channels=1, feature_size=(28, 28), patch_size=4, embed_dim=16, num_heads=2),
    "pw4-68px-nonsquare": dict(in_channels=9, feature_size=(20, 68), patch_size=4, embed_dim=36, num_heads=3),
    "ph3-pw4-20px": dict(in_channels=5, feature_size=(12, 20), patch_size=(3, 4), embed_dim=16, num_heads=2),
    "pw8-40px-extra": dict(in_channels=16, feature_size=(16, 40), patch_size=8, embed_dim=32, num_heads=4,
                           extra_tokens=1, extra_dim=12),
    "pw2-K-blocks": dict(in_channels=300, feature_size=(4, 24), patch_size=2, embed_dim=13, num_heads=1),
    # the panels: pw = 16, a 16-pixel row, pw = 5
    "pw16-panels": dict(in_channels=5, feature_size=(32, 48), patch_size=16, embed_dim=24, num_heads=1),
    "pw4-16px-panels": dict(in_channels=7, feature_size=(8, 16), patch_size=4, embed_dim=32, num_heads=2),
    "pw5-panels": dict(in_channels=4, feature_size=(15, 25), patch_size=5, embed_dim=32, num_heads=4),
}
DIRECT = [n for n in CONFIGS if not n.endswith("-panels")]
PANELS = [n for n in CONFIGS if n.endswith("-panels")]


def config(name: str) -> SLViTConfig:
    return SLViTConfig(**{**SMALL_HIDDEN, "key_dim": 16, **CONFIGS[name]})


@pytest.fixture(params=["auto", "gather"])
def embed(request, monkeypatch):
    monkeypatch.setenv("SLVIT_FAST_CPU_ISA", "avx512")
    monkeypatch.setenv(EMBED_ENV, request.param)
    return request.param


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_against_reference(name, batch, embed, threads):
    with torch.no_grad():
        check_against_reference("cpu", config(name), batch, torch.float32, backward=False)


@pytest.mark.parametrize("name", ["pw4-28px-C1", "pw8-40px-extra"])  # C = 1: unit pixel stride, direct
def test_channels_last_input(name, embed):
    with torch.no_grad():
        check_against_reference("cpu", config(name), 3, torch.float32, backward=False, channels_last=True)


@pytest.mark.parametrize("name", ["pw2-20px", "pw4-68px-nonsquare", "ph3-pw4-20px", "pw8-40px-extra", "pw2-K-blocks",
                                  "pw5-panels"])
@pytest.mark.parametrize("batch", [1, 5])
def test_training_forward_and_gradients(name, batch, embed, threads, monkeypatch):
    # These problems are under the training path's one-thread size (slvit_cpu.cpp, train_split): forced
    # one-sample chunks make 2 threads run 2 workers (at batch 5; batch 1 has one sample, one worker).
    monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_CHUNK", "1")
    check_against_reference("cpu", config(name), batch, torch.float32, backward=True)
    seen = training_threads(config(name), batch)
    assert seen == min(threads, batch), f"{seen} thread(s) ran the training chunks on {threads} threads, batch {batch}"


def training_threads(cfg, batch, tries=3) -> int:
    """Threads that ran the training kernels' chunks (their profiler ranges) in a forward + backward; the most
    of ``tries`` steps (workers claim chunks from a shared counter: a late-waking worker may find none)."""
    m = randomize_(SLViTExit(cfg, backend="cpu"))
    x = torch.randn(batch, cfg.in_channels, *cfg.feature_size, requires_grad=True)
    seen = 0
    for _ in range(tries):
        with torch.autograd.profiler.profile() as prof:
            m(x, _extra(cfg, batch)).sum().backward()
        seen = max(seen, len({e.thread for e in prof.function_events
                              if e.name.startswith(("slvit_cpu::fwd_", "slvit_cpu::bwd_"))}))
    return seen


def _module(cfg):
    return randomize_(SLViTExit(cfg, backend="cpu")).eval()


def _extra(cfg, batch):
    return torch.randn(batch, cfg.extra_tokens, cfg.extra_dim) if cfg.extra_tokens else None


@pytest.mark.parametrize("name", ["pw4-68px-nonsquare", "pw8-40px-extra"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_strided_and_expanded_inputs_give_the_bits_of_a_copy(name, nthreads, monkeypatch):
    monkeypatch.setenv("SLVIT_FAST_CPU_PARALLEL_MIN_FLOPS", "0")
    cfg = config(name)
    m = _module(cfg)
    H, W = cfg.feature_size
    big = torch.randn(3, cfg.in_channels + 2, H + 3, W + 5)
    strided = big[:, 1:cfg.in_channels + 1, 2:H + 2, 3:W + 3]  # row, plane and sample strides of `big`
    expanded = torch.randn(1, cfg.in_channels, H, W).expand(3, -1, -1, -1)  # sample stride 0
    extra = _extra(cfg, 3)
    with num_threads(nthreads), torch.no_grad():
        for x in (strided, expanded):
            assert not x.is_contiguous()
            assert torch.equal(m(x, extra), m(x.contiguous(), extra))


@pytest.mark.parametrize("name", DIRECT + ["resnet152-b1"])
@pytest.mark.parametrize("nthreads", [2, 3])
def test_a_teams_batch_1_packing_gives_the_bits_of_a_batch_of_2(name, nthreads, monkeypatch):
    """A team's one-sample call packs the embedding weight one row block at a time into a small buffer (the
    whole packed weight was written cold on every call); a batch of 2 packs it whole. Same tiles, same sums:
    the sample must come out with the same bits either way (2 and 3 workers: other channel shares; embed
    dims 13-36 and resnet152-b1's 32: one to three row blocks, uneven heights)."""
    from slvit_fast.exit_presets import PRESETS

    monkeypatch.setenv("SLVIT_FAST_CPU_PARALLEL_MIN_FLOPS", "0")
    monkeypatch.setenv("SLVIT_FAST_CPU_ISA", "avx512")
    cfg = SLViTConfig(**PRESETS[name].slvit_kwargs()) if name in PRESETS else config(name)
    m = _module(cfg)
    x = torch.randn(2, cfg.in_channels, *cfg.feature_size)
    extra = _extra(cfg, 2)
    with num_threads(nthreads), torch.no_grad():
        one = m(x[:1], None if extra is None else extra[:1])
        two = m(x, extra)
    assert torch.equal(one[0], two[0])


def _auto_and_panels(cfg, batch, train, monkeypatch):
    m = _module(cfg).train(train)
    x = torch.randn(batch, cfg.in_channels, *cfg.feature_size)
    extra = _extra(cfg, batch)
    with torch.set_grad_enabled(train):
        monkeypatch.setenv(EMBED_ENV, "gather")
        panels = m(x, extra)
        monkeypatch.setenv(EMBED_ENV, "auto")
        direct = m(x, extra)
        monkeypatch.setenv(EMBED_ENV, " AUTO ")  # trimmed, any case
        assert torch.equal(m(x, extra), direct)
    return direct.detach(), panels.detach()


@pytest.mark.parametrize("name", DIRECT)
@pytest.mark.parametrize("batch", [1, 64])  # 2 threads: a team at batch 1, workers owning samples at 64
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_direct_path_runs_where_it_applies(name, batch, train, threads, monkeypatch):
    monkeypatch.setenv("SLVIT_FAST_CPU_ISA", "avx512")
    direct, panels = _auto_and_panels(config(name), batch, train, monkeypatch)
    # different summation order: equal to float32 rounding, not bit for bit (else the kernel did not run)
    assert not torch.equal(direct, panels)
    torch.testing.assert_close(direct, panels, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PANELS)
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_panels_where_the_direct_path_does_not_apply(name, train, monkeypatch):
    monkeypatch.setenv("SLVIT_FAST_CPU_ISA", "avx512")
    direct, panels = _auto_and_panels(config(name), 3, train, monkeypatch)
    assert torch.equal(direct, panels)


def test_channels_last_with_several_channels_takes_the_panels(monkeypatch):
    monkeypatch.setenv("SLVIT_FAST_CPU_ISA", "avx512")
    cfg = config("pw8-40px-extra")
    m = _module(cfg)
    x = torch.randn(3, cfg.in_channels, *cfg.feature_size).contiguous(memory_format=torch.channels_last)
    extra = _extra(cfg, 3)
    with torch.no_grad():
        monkeypatch.setenv(EMBED_ENV, "gather")
        panels = m(x, extra)
        monkeypatch.setenv(EMBED_ENV, "auto")
        assert torch.equal(m(x, extra), panels)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", ["pw2-20px", "pw5-panels"])
def test_invalid_switch_value_is_an_error_naming_it(name, train, monkeypatch):
    """On every path, also where the direct kernel would not apply (the value is read first)."""
    cfg = config(name)
    m = _module(cfg).train(train)
    monkeypatch.setenv(EMBED_ENV, "rows")
    with pytest.raises(RuntimeError, match="SLVIT_FAST_CPU_EMBED='rows'.*auto or gather"):
        with torch.set_grad_enabled(train):
            m(torch.randn(2, cfg.in_channels, *cfg.feature_size), _extra(cfg, 2))
