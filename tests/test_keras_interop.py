"""SLViTExit.from_keras reproduces the Keras 3 model built by build_keras_slvit (the paper's framework)."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")  # a dev dependency: the README test command installs it

from slvit_fast import CheckpointMismatchError, SLViTConfig, SLViTExit  # noqa: E402
from slvit_fast.interop.keras import build_keras_slvit  # noqa: E402

SMALL = dict(mlp_dim=48, head_hidden=24, num_outputs=5)
CONFIGS = {
    "square-7x7": SLViTConfig(in_channels=8, feature_size=(28, 28), patch_size=4, embed_dim=32, num_heads=3, **SMALL),
    "nonsquare-grid-3x5": SLViTConfig(in_channels=3, feature_size=(9, 20), patch_size=(3, 4), embed_dim=16,
                                      num_heads=2, key_dim=8, **SMALL),
    "no-mlp-residual-relu": SLViTConfig(in_channels=4, feature_size=(12, 12), patch_size=3, embed_dim=16,
                                        num_heads=4, mlp_residual=False, activation="relu", ln_eps=1e-3, **SMALL),
    "extra-tokens-2-layers": SLViTConfig(in_channels=4, feature_size=(16, 8), patch_size=4, embed_dim=16,
                                         num_heads=2, extra_tokens=2, extra_dim=6, num_layers=2, **SMALL),
}


def _randomize_keras(model, seed):
    """Non-trivial weights at a Glorot-like scale (LayerNorm gammas around 1, biases nonzero)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        new = []
        for i, w in enumerate(weights):
            std = 1.0 / np.sqrt(w.shape[0]) if w.ndim > 1 else 0.2
            offset = 1.0 if "norm" in layer.name and i == 0 else 0.0
            new.append((rng.normal(0, std, w.shape) + offset).astype(w.dtype))
        if new:
            layer.set_weights(new)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_keras_matches_keras_outputs(name):
    config = CONFIGS[name]
    model = build_keras_slvit(config)
    _randomize_keras(model, seed=len(name))
    rng = np.random.default_rng(1)
    H, W = config.feature_size
    x_nhwc = rng.normal(0, 1, (3, H, W, config.in_channels)).astype("float32")
    inputs = [x_nhwc]
    extra = None
    if config.extra_tokens:
        extra = rng.normal(0, 1, (3, config.extra_tokens, config.extra_dim)).astype("float32")
        inputs.append(extra)
    expected = np.asarray(model.predict(inputs if extra is not None else x_nhwc, verbose=0))

    exit_module = SLViTExit.from_keras(model, backend="torch").eval()
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)  # NHWC -> NCHW view (channels_last memory)
    with torch.no_grad():
        got = exit_module(x, None if extra is None else torch.from_numpy(extra)).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert np.abs(expected).max() > 1e-2  # a non-trivial comparison


def test_parameter_counts_agree_with_keras():
    for config in CONFIGS.values():
        model = build_keras_slvit(config)
        assert model.count_params() == sum(p.numel() for p in SLViTExit(config).parameters())


def test_from_keras_rejects_mismatched_config():
    model = build_keras_slvit(CONFIGS["square-7x7"])
    wrong = CONFIGS["square-7x7"].replace(num_heads=4)
    with pytest.raises(CheckpointMismatchError, match="attn.q.weight"):
        SLViTExit.from_keras(model, config=wrong)
