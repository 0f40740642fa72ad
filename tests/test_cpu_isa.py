"""The fused CPU inference path on each instruction set (``SLVIT_FAST_CPU_ISA``) against the reference.

The fused forward's GEMMs run on AVX2 tiles (csrc/cpu/fused_avx2.cpp, 8-wide, columns padded to 8) or
AVX-512 tiles (csrc/cpu/fused_avx512.cpp, 16-wide, masked column tails). Both are checked against the
torch reference over the paper presets and awkward shapes, both thread-work splits, every column tail
1..15 past a multiple of 16, GELU/ReLU heads, residual on/off and extra tokens; the two must agree to
float32 rounding; and the switch's values and errors. ``SLVIT_FAST_CPU_TEST_HIDE_FEATURE`` (a test knob
of csrc/cpu/fused_avx2.cpp) makes an AVX-512 feature count as missing, so the fallback and the error of
a forced ``avx512`` are tested on this CPU too.
"""

from __future__ import annotations

import pytest
import torch

from conftest import num_threads
from kernel_cases import AWKWARD_CONFIGS, awkward_config, check_against_reference, randomize_
from slvit_fast import SLViTConfig, SLViTExit
from slvit_fast.backends import cpu_backend
from slvit_fast.exit_presets import PRESETS

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = [
    pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}"),
    pytest.mark.skipif(not has_avx2, reason="the fused CPU kernels need AVX2+FMA"),
]

ISA_ENV = "SLVIT_FAST_CPU_ISA"
HIDE_ENV = "SLVIT_FAST_CPU_TEST_HIDE_FEATURE"


def auto_isa() -> str | None:
    return cpu_backend.fused_isa() if reason is None and has_avx2 else None


HAS_AVX512 = auto_isa() == "avx512"


@pytest.fixture(params=["avx2", "avx512"])
def isa(request, monkeypatch):
    if request.param == "avx512" and not HAS_AVX512:
        pytest.skip("this CPU (or OS) has no AVX-512F/DQ/BW/VL")
    monkeypatch.setenv(ISA_ENV, request.param)
    assert cpu_backend.fused_isa() == request.param
    return request.param


def check_inference(config, batch, **kw):
    with torch.no_grad():
        return check_against_reference("cpu", config, batch, torch.float32, backward=False, **kw)


@pytest.mark.parametrize("name", list(AWKWARD_CONFIGS))
@pytest.mark.parametrize("batch", [1, 3, 24])
def test_awkward_configs(name, batch, isa, threads):
    check_inference(awkward_config(name), batch)


@pytest.mark.parametrize("preset", ["resnet152-b1", "inceptionv3-b1-cifar100", "audiocsrnet-av1"])
@pytest.mark.parametrize("batch", [1, 5])
def test_presets(preset, batch, isa, threads):
    check_inference(SLViTConfig(**PRESETS[preset].slvit_kwargs()), batch)


@pytest.mark.parametrize("tokens", range(17, 32))
def test_every_column_tail(tokens, isa, threads):
    # T = 17..31 tokens: the attention products run over T columns (tails 1..15 past 16), and the head's
    # output GEMM over `batch` columns (4..18: tails 4..15, 0, 1, 2); ReLU head, no MLP residual.
    c = SLViTConfig(in_channels=3, feature_size=(1, tokens), patch_size=1, embed_dim=16, num_heads=2, key_dim=8,
                    mlp_dim=40, head_hidden=24, num_outputs=5, activation="relu", mlp_residual=False)
    check_inference(c, tokens - 13)


@pytest.mark.parametrize("heads", [1, 24])
def test_heads(heads, isa):
    check_inference(awkward_config("N25-h1", num_heads=heads), 7)


@pytest.fixture(params=[2, 4], ids=["2threads", "4threads"])
def team(request, monkeypatch):
    """The batch-1 team path with 2 or 4 workers (4 oversubscribe 2 cores: fine for tiny configs)."""
    monkeypatch.setenv("SLVIT_FAST_CPU_PARALLEL_MIN_FLOPS", "0")
    with num_threads(request.param):
        yield request.param


@pytest.mark.parametrize("mlp", [3, 8, 16, 37])
@pytest.mark.parametrize("heads", [3, 5])
def test_team_splits_with_fewer_blocks_than_workers(mlp, heads, isa, team):
    """The team splits the embedding by channel, the MLP by hidden unit and attention by heads; with fewer
    row blocks (or channels) than workers, worker 0 may get none and must still write bias and residual.
    (The MLP split missed that: mlp_dim 8 on 2 threads returned garbage from the workspace.)"""
    c = awkward_config("N25-h1", in_channels=1, num_heads=heads, key_dim=8, mlp_dim=mlp, num_layers=2)
    check_inference(c, 1)


@pytest.mark.parametrize("tokens", [19, 24, 31])
def test_column_tails_at_batch_1(tokens, isa, threads):
    """Tails 3, 8 and 15 past 16 tokens on the batch-1 (team) path as well."""
    c = SLViTConfig(in_channels=3, feature_size=(1, tokens), patch_size=1, embed_dim=16, num_heads=2, key_dim=8,
                    mlp_dim=40, head_hidden=24, num_outputs=5)
    check_inference(c, 1)


def test_batch_64_two_layers(isa, threads):
    check_inference(awkward_config("N49-nores-relu", num_layers=2), 64)


@pytest.mark.skipif(not HAS_AVX512, reason="this CPU (or OS) has no AVX-512F/DQ/BW/VL")
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("preset", ["resnet152-b1", "audiocsrnet-av1"])
def test_avx512_equals_avx2_to_rounding(preset, batch, monkeypatch):
    c = SLViTConfig(**PRESETS[preset].slvit_kwargs())
    m = randomize_(SLViTExit(c, backend="cpu")).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, c.in_channels, *c.feature_size, generator=g)
    extra = torch.randn(batch, c.extra_tokens, c.extra_dim, generator=g) if c.extra_tokens else None
    outs = {}
    for name in ("avx2", "avx512"):
        monkeypatch.setenv(ISA_ENV, name)
        with torch.no_grad():
            outs[name] = m(x, extra)
    scale = outs["avx2"].abs().max().item()
    diff = (outs["avx512"] - outs["avx2"]).abs().max().item()
    # same summation order per element; only GELU's 1/den (rcp14 + Newton vs a divide) differs by ~1 ulp
    assert diff <= 4e-6 * scale, f"AVX-512 and AVX2 outputs differ by {diff:.3e} (scale {scale:.3e})"


def test_batch_1_entry_point_on_each_isa(isa, threads):
    from slvit_fast import _C_cpu

    c = SLViTConfig(**PRESETS["audiocsrnet-av1"].slvit_kwargs())
    ours = randomize_(SLViTExit(c, backend="cpu")).eval()
    ref = SLViTExit(c, backend="torch").eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, c.in_channels, *c.feature_size)
    extra = torch.randn(1, c.extra_tokens, c.extra_dim)
    with torch.no_grad():
        out = _C_cpu.exit_infer(ours, x, extra)
        expected = ref(x, extra)
    assert out is not None, "the entry point declined"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_switch_values(monkeypatch):
    for value in ("", "  ", "auto", "AUTO"):
        monkeypatch.setenv(ISA_ENV, value)
        assert cpu_backend.fused_isa() == ("avx512" if HAS_AVX512 else "avx2"), value
    for value, expected in (("avx2", "avx2"), (" AVX2 ", "avx2")):
        monkeypatch.setenv(ISA_ENV, value)
        assert cpu_backend.fused_isa() == expected
    monkeypatch.setenv(ISA_ENV, "avx512")
    monkeypatch.setenv("SLVIT_FAST_CPU_FUSED", "0")
    assert cpu_backend.fused_isa() is None  # the fused path is off: no ISA in use


def test_unknown_value_is_an_error_naming_it(monkeypatch):
    c = awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend="cpu")).eval()
    x = torch.randn(1, c.in_channels, *c.feature_size)
    monkeypatch.setenv(ISA_ENV, "avx1024")
    with pytest.raises(RuntimeError, match="SLVIT_FAST_CPU_ISA='avx1024'"):
        cpu_backend.fused_isa()
    for batch in (1, 3):  # the batch-1 entry point declines, the op path raises
        with torch.no_grad(), pytest.raises(RuntimeError, match="SLVIT_FAST_CPU_ISA='avx1024'.*auto/avx2/avx512"):
            m(x.expand(batch, -1, -1, -1))


@pytest.mark.skipif(not HAS_AVX512, reason="this CPU (or OS) has no AVX-512F/DQ/BW/VL: nothing to hide")
@pytest.mark.parametrize("feature", ["avx512f", "avx512dq", "avx512bw", "avx512vl"])
def test_missing_avx512_feature(feature, monkeypatch):
    monkeypatch.setenv(HIDE_ENV, feature)
    # auto falls back to AVX2 and stays correct
    monkeypatch.setenv(ISA_ENV, "auto")
    assert cpu_backend.fused_isa() == "avx2"
    check_inference(awkward_config("N49-h8-kd36"), 3)
    # a forced avx512 is an error naming the missing feature
    monkeypatch.setenv(ISA_ENV, "avx512")
    with pytest.raises(RuntimeError, match=f"SLVIT_FAST_CPU_ISA='avx512'.*lacks {feature}"):
        cpu_backend.fused_isa()
    with torch.no_grad(), pytest.raises(RuntimeError, match=f"lacks {feature}"):
        check_inference(awkward_config("N49-h8-kd36"), 3)
