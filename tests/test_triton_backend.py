"""Triton backend vs the torch reference, under the Triton interpreter (CPU tensors, TRITON_INTERPRET=1).

Forward and every gradient (feature map, extra tokens, every parameter) for every preset configuration
and the awkward shapes of ``kernel_cases``; fp32 tight, fp16 with the paired tolerance; robustness
(large magnitudes, NaN); launch counts; clear errors. Interpreter time dominates: most cases use batch
1-3, and presets that are the *same configuration* (e.g. resnet152-b1 and densenet201-b1) run once.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import slvit_fast as sf  # noqa: E402
from slvit_fast import SLViTConfig, SLViTExit, backends  # noqa: E402
from slvit_fast.exit_presets import get_preset  # noqa: E402
from slvit_fast.profiling import count_kernel_launches  # noqa: E402

from kernel_cases import (  # noqa: E402
    AWKWARD_CONFIGS,
    awkward_config,
    check_against_reference,
    randomize_,
    requires_half,
)

TRITON_REASON = backends.status(torch.empty(1, 1, 1, 1)).get("triton")
pytestmark = pytest.mark.skipif(TRITON_REASON != "available", reason=f"triton backend: {TRITON_REASON}")


def _unique_preset_configs() -> dict[str, SLViTConfig]:
    """Preset name(s) -> config; presets with identical configs share one entry (ids list them all)."""
    groups: dict[SLViTConfig, list[str]] = {}
    for name in sf.list_presets():
        groups.setdefault(SLViTConfig(**get_preset(name).slvit_kwargs()), []).append(name)
    return {"+".join(names): cfg for cfg, names in groups.items()}


PRESET_CONFIGS = _unique_preset_configs()


def test_every_preset_is_covered():
    covered = {n for key in PRESET_CONFIGS for n in key.split("+")}
    assert covered == set(sf.list_presets())


@pytest.mark.slow
@pytest.mark.parametrize("presets", list(PRESET_CONFIGS))
def test_preset_forward_backward_fp32(presets):
    """Full-size preset exits (real channel counts, 72x128 maps for AudioCSRNet), batch 1."""
    check_against_reference("triton", PRESET_CONFIGS[presets], batch=1)


@pytest.mark.parametrize("name", list(AWKWARD_CONFIGS))
def test_awkward_forward_backward_fp32(name):
    check_against_reference("triton", awkward_config(name), batch=2)


def test_batch3_channels_last():
    check_against_reference("triton", awkward_config("N49-h8-kd36"), batch=3, channels_last=True)


def test_two_layers_forward_backward():
    check_against_reference("triton", awkward_config("N25-h1", num_layers=2, num_heads=3), batch=2)


def test_two_layers_no_residual_relu():
    check_against_reference("triton", awkward_config("nonsquare-patch", num_layers=2, mlp_residual=False,
                                                     activation="relu"), batch=2)


def test_batch64_forward():
    """Batch 64 once (forward only: the interpreter runs one program per sample)."""
    check_against_reference("triton", awkward_config("nonsquare-patch", mlp_dim=32, head_hidden=16), batch=64,
                            backward=False)


@requires_half
@pytest.mark.parametrize("name", ["N49-h8-kd36", "N49-nores-relu"])
def test_awkward_forward_backward_fp16(name):
    check_against_reference("triton", awkward_config(name), batch=2, dtype=torch.float16)


@requires_half
def test_preset_fp16_small_channels():
    """A paper geometry (DISCO 16x9 grid + audio token, 12 heads) in fp16 with few channels."""
    cfg = SLViTConfig(**{**get_preset("audiocsrnet-av1").slvit_kwargs(), "in_channels": 4, "extra_dim": 16})
    check_against_reference("triton", cfg, batch=1, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=requires_half)])
def test_large_magnitude_features(dtype):
    """+-1e4 features: the softmax stays finite and matches the reference."""
    cfg = awkward_config("N49-h8-kd36")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.in_channels, *cfg.feature_size, generator=g, dtype=torch.float64).sign() * 1e4
    x = x * torch.rand(x.shape, generator=g, dtype=torch.float64)
    out = check_against_reference("triton", cfg, batch=2, dtype=dtype, x=x)
    assert torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nan_propagates_like_reference():
    cfg = awkward_config("N25-h1")
    m = randomize_(SLViTExit(cfg, backend="torch")).eval()
    x = torch.randn(3, cfg.in_channels, *cfg.feature_size)
    x[1, 2, 3, 4] = float("nan")
    ref = m(x)
    ours = copy.deepcopy(m)
    ours.backend = "triton"
    out = ours(x)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], rtol=1e-4, atol=1e-5)


def test_launch_counts():
    cfg = awkward_config("N25-h1")
    m = randomize_(SLViTExit(cfg, backend="triton")).eval()
    x = torch.randn(2, cfg.in_channels, *cfg.feature_size, requires_grad=True)
    with count_kernel_launches() as fwd:
        y = m(x)
    assert fwd.count == 3, fwd.by_kernel
    assert set(fwd.by_kernel) == {"triton_patch_embed_fwd", "triton_attention_fwd", "triton_mlp_head_fwd"}
    with count_kernel_launches() as bwd:
        y.sum().backward()
    # 3 fused backward kernels (+1 zero-fill of the weight-gradient accumulators per atomic kernel on CUDA)
    assert bwd.by_kernel == {"triton_mlp_head_bwd": 1, "triton_attention_bwd": 1, "triton_patch_embed_bwd": 1}
    m2 = randomize_(SLViTExit(awkward_config("N25-h1", num_layers=2), backend="triton")).eval()
    with count_kernel_launches() as fwd2:
        m2(x)
    assert fwd2.count == 5  # 1 + 2 per encoder layer


def test_dropout_training_falls_back_with_one_warning():
    from slvit_fast.backends import common

    common.forget_warnings()
    cfg = awkward_config("N25-h1", dropout=0.1)
    m = randomize_(SLViTExit(cfg, backend="triton")).train()
    x = torch.randn(2, cfg.in_channels, *cfg.feature_size)
    with pytest.warns(RuntimeWarning, match="does not fuse dropout"):
        with count_kernel_launches() as launches:
            m(x)
    assert launches.count == 0  # ran on the torch reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # once only
    m.eval()
    with count_kernel_launches() as launches:
        m(x)  # eval mode: dropout is the identity, fused path
    assert launches.count == 3


def test_dropout_free_training_is_fused():
    cfg = awkward_config("N25-h1")
    m = randomize_(SLViTExit(cfg, backend="triton")).train()
    x = torch.randn(2, cfg.in_channels, *cfg.feature_size)
    with count_kernel_launches() as launches:
        m(x).sum().backward()
    assert launches.count == 6


def test_bad_inputs_clear_errors():
    cfg = awkward_config("N25-h1")
    m = SLViTExit(cfg, backend="triton")
    with pytest.raises(sf.SLViTInputError, match=r"channels.*\(2, 7, 10, 10\)"):
        m(torch.randn(2, 7, 10, 10))
    with pytest.raises(TypeError, match="float64"):
        m(torch.randn(2, cfg.in_channels, 10, 10, dtype=torch.float64))
    with pytest.raises(sf.BackendUnavailableError, match="float64"):
        m.double()(torch.randn(2, cfg.in_channels, 10, 10, dtype=torch.float64))
    with pytest.raises(sf.BackendUnavailableError, match="bfloat16"):
        m.to(torch.bfloat16)(torch.randn(2, cfg.in_channels, 10, 10, dtype=torch.bfloat16))


def test_unavailable_reasons():
    from slvit_fast.backends.triton_backend import BACKEND

    assert BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1)) is None
    assert "float64" in BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1, dtype=torch.float64))
    meta = torch.empty(1, 1, 1, 1, device="meta")
    assert "CPU tensors" in BACKEND.unavailable_reason(meta)


@st.composite
def _configs(draw):
    ph, pw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    gh, gw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    extra = draw(st.integers(0, 2))
    heads = draw(st.integers(1, 4))
    return SLViTConfig(
        in_channels=draw(st.integers(1, 5)), feature_size=(gh * ph, gw * pw), patch_size=(ph, pw),
        embed_dim=draw(st.sampled_from([4, 16, 20, 32, 36])), num_heads=heads,
        key_dim=draw(st.sampled_from([None, 3, 16, 36])), mlp_dim=draw(st.integers(1, 70)),
        head_hidden=draw(st.integers(1, 40)), num_outputs=draw(st.integers(1, 20)),
        mlp_residual=draw(st.booleans()), activation=draw(st.sampled_from(["gelu", "relu"])),
        ln_eps=draw(st.sampled_from([1e-6, 1e-3])), extra_tokens=extra,
        extra_dim=draw(st.integers(1, 9)) if extra else 0,
    )


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=_configs(), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_property_random_configs_forward(cfg, batch, seed):
    check_against_reference("triton", cfg, batch=batch, backward=False, seed=seed)
