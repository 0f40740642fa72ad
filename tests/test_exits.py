"""SLViTExit / CNNExit modules, presets and the reference maths, on the torch backend."""

import math

import pytest
import torch
import torch.nn.functional as F

import slvit_fast as sf
from slvit_fast import reference
from slvit_fast.errors import SLViTInputError

SMALL = dict(mlp_dim=32, head_hidden=16, num_outputs=3)


def small_config(**kw):
    base = dict(in_channels=4, feature_size=(8, 12), patch_size=(2, 3), embed_dim=8, num_heads=2, **SMALL)
    return sf.SLViTConfig(**{**base, **kw})


@pytest.mark.parametrize("preset", sf.list_presets())
def test_every_preset_runs_forward(preset):
    exit_module = sf.SLViTExit.from_preset(preset, backend="torch").eval()
    c = exit_module.config
    x = torch.randn(2, c.in_channels, *c.feature_size)
    extra = torch.randn(2, c.extra_tokens, c.extra_dim) if c.extra_tokens else None
    with torch.no_grad():
        out = exit_module(x, extra)
    assert out.shape == (2, c.num_outputs) and torch.isfinite(out).all()
    cnn = sf.CNNExit.from_preset(preset).eval()
    with torch.no_grad():
        assert cnn(x, extra[:, 0] if extra is not None else None).shape == (2, c.num_outputs)


def test_patch_order_is_keras_row_col_channel():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    patches = reference.extract_patches(x, (2, 3))  # grid 2x2
    assert patches.shape == (2, 4, 18)
    for b in range(2):
        for gy in range(2):
            for gx in range(2):
                expected = [x[b, c, gy * 2 + i, gx * 3 + j] for i in range(2) for j in range(3) for c in range(3)]
                assert patches[b, gy * 2 + gx].tolist() == torch.stack(expected).tolist()


def test_attention_block_matches_per_head_loop():
    torch.manual_seed(0)
    B, T, d, h, kd = 2, 5, 6, 3, 4
    t = torch.randn(B, T, d, dtype=torch.float64)
    lw, lb = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    ws = [torch.randn(h * kd, d, dtype=torch.float64) for _ in range(3)]
    bs = [torch.randn(h * kd, dtype=torch.float64) for _ in range(3)]
    wo, bo = torch.randn(d, h * kd, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    got = reference.attention_block(t, lw, lb, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], wo, bo, h, 1e-6)
    y = F.layer_norm(t, (d,), lw, lb, 1e-6)
    heads = []
    for i in range(h):
        sl = slice(i * kd, (i + 1) * kd)
        q, k, v = (y @ w[sl].T + b[sl] for w, b in zip(ws, bs))
        heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(kd), -1) @ v)
    expected = t + torch.cat(heads, -1) @ wo.T + bo
    torch.testing.assert_close(got, expected)


def test_keras_semantics_width():
    exit_module = sf.SLViTExit(sf.SLViTConfig(in_channels=128, feature_size=28, patch_size=4, embed_dim=32, num_heads=12))
    assert exit_module.layers[0].attn.q.weight.shape == (384, 32)  # 12 heads x key_dim 32
    assert exit_module.layers[0].attn.out.weight.shape == (32, 384)


def test_channels_last_input_gives_same_output():
    exit_module = sf.SLViTExit(small_config(), backend="torch").eval()
    x = torch.randn(3, 4, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(exit_module(x.contiguous(memory_format=torch.channels_last)), exit_module(x))


def test_mlp_residual_switch_changes_output():
    torch.manual_seed(0)
    a = sf.SLViTExit(small_config(), backend="torch").eval()
    b = sf.SLViTExit(small_config(mlp_residual=False), backend="torch").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_two_layer_ablation_has_two_encoders():
    exit_module = sf.SLViTExit(small_config(num_layers=2), backend="torch")
    assert len(exit_module.layers) == 2
    assert exit_module(torch.randn(1, 4, 8, 12)).shape == (1, 3)


def test_dropout_only_in_training():
    exit_module = sf.SLViTExit(small_config(head_dropout=0.5, dropout=0.2, attention_dropout=0.1), backend="torch")
    x = torch.randn(4, 4, 8, 12)
    exit_module.eval()
    with torch.no_grad():
        torch.testing.assert_close(exit_module(x), exit_module(x))
        exit_module.train()
        torch.manual_seed(0)
        first = exit_module(x)
        torch.manual_seed(1)
        assert not torch.allclose(first, exit_module(x))


# --- bad input -----------------------------------------------------------------------------------------

def test_patch_must_divide_feature_map():
    with pytest.raises(ValueError, match=r"28x28 is not divisible by the patch 5x5"):
        sf.SLViTConfig(in_channels=8, feature_size=28, patch_size=5)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(2, 5, 8, 12), r"5 channels but the config expects in_channels=4"),
        (torch.randn(2, 4, 8, 10), r"8x10 but the config expects feature_size=\(8, 12\)"),
        (torch.randn(4, 8, 12), r"4-D feature map .* \(rank 3\)"),
        (torch.ones(2, 4, 8, 12, dtype=torch.int64), r"floating-point .* torch.int64"),
        (torch.randn(2, 8, 12, 4), r"12x4 but the config|8 channels"),
    ],
)
def test_bad_feature_maps_are_named(x, match):
    exit_module = sf.SLViTExit(small_config(), backend="torch")
    with pytest.raises(SLViTInputError, match=match):
        exit_module(x)


def test_dtype_mismatch_is_named():
    with pytest.raises(TypeError, match="float64 differs"):
        sf.SLViTExit(small_config(), backend="torch")(torch.randn(1, 4, 8, 12, dtype=torch.float64))


def test_extra_tokens_are_checked():
    exit_module = sf.SLViTExit(small_config(extra_tokens=2, extra_dim=5), backend="torch")
    x = torch.randn(2, 4, 8, 12)
    with pytest.raises(SLViTInputError, match=r"pass extra="):
        exit_module(x)
    with pytest.raises(SLViTInputError, match=r"\(2, 2, 5\), got \(2, 1, 5\)"):
        exit_module(x, torch.randn(2, 1, 5))
    assert exit_module(x, torch.randn(2, 2, 5)).shape == (2, 3)
    with pytest.raises(SLViTInputError, match="extra_tokens=0"):
        sf.SLViTExit(small_config(), backend="torch")(x, torch.randn(2, 2, 5))


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'resnet50-b1'; valid presets: resnet152-b1, "):
        sf.SLViTExit.from_preset("resnet50-b1")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(ln_eps=float("nan")), "ln_eps"),
        (dict(head_dropout=1.0), "head_dropout"),
        (dict(activation="swish"), "activation"),
        (dict(extra_tokens=1), "extra_tokens and extra_dim go together"),
        (dict(num_heads=0), "num_heads must be positive"),
    ],
)
def test_bad_config_values_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        small_config(**kw)


def test_config_round_trips_through_plain_data():
    c = small_config(extra_tokens=1, extra_dim=3, mlp_residual=False)
    assert sf.SLViTConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown SLViTConfig field"):
        sf.SLViTConfig.from_dict({**c.to_dict(), "heads": 3})


def test_cnn_exit_film_and_errors():
    cnn = sf.CNNExit.from_preset("audiocsrnet-av1")
    x = torch.randn(1, 512, 72, 128)
    with pytest.raises(ValueError, match="pass extra"):
        cnn(x)
    assert cnn(x, torch.randn(1, 128)).shape == (1, 1)
    with pytest.raises(SLViTInputError, match="256 channels"):
        sf.CNNExit.from_preset("resnet152-b1")(torch.randn(1, 256, 28, 28))
