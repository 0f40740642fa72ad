"""Keras 3 interop: the paper's own implementation is Keras.

``build_keras_slvit(config)`` builds the Keras model equivalent to :class:`slvit_fast.SLViTExit` (the
layer stack of the Keras ViT example the paper builds on), and ``slvit_from_keras`` (used by
``SLViTExit.from_keras``) copies its weights. Keras is optional: it is imported only here, and its
backend defaults to torch (``KERAS_BACKEND``) when Keras was not imported before.

Layouts: Keras ``Dense`` kernels are (in, out), torch's (out, in); Keras ``MultiHeadAttention`` keeps
per-head kernels (d, h, key_dim) and an output kernel (h, key_dim, d). Inputs are channels-last
(B, H, W, C) in Keras; patches are flattened (ph, pw, C) in both, so no permutation of the patch
projection is needed.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch

from ..config import SLViTConfig
from ..errors import CheckpointMismatchError


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as e:  # optional dependency
        raise ImportError("Keras interop needs Keras 3: pip install 'keras>=3' (or slvit_fast[dev])") from e
    if int(keras.__version__.split(".")[0]) < 3:
        raise ImportError(f"Keras interop needs Keras 3, found {keras.__version__}")
    return keras


@functools.cache
def _patch_encoder_class():
    keras = _keras()

    @keras.saving.register_keras_serializable(package="slvit_fast")
    class PatchEncoder(keras.layers.Layer):
        """Dense patch projection + learned position Embedding (the Keras ViT example's PatchEncoder)."""

        def __init__(self, num_patches: int, projection_dim: int, **kwargs):
            super().__init__(**kwargs)
            self.num_patches = num_patches
            self.projection_dim = projection_dim
            self.projection = keras.layers.Dense(projection_dim, name="projection")
            self.position_embedding = keras.layers.Embedding(num_patches, projection_dim, name="position_embedding")

        def build(self, input_shape):
            self.projection.build(input_shape)
            self.position_embedding.build((self.num_patches,))
            super().build(input_shape)

        def call(self, patches):
            positions = keras.ops.arange(0, self.num_patches)
            return self.projection(patches) + self.position_embedding(positions)

        def get_config(self):
            return {**super().get_config(), "num_patches": self.num_patches, "projection_dim": self.projection_dim}

    return PatchEncoder


def build_keras_slvit(config: SLViTConfig):
    """The Keras 3 model equivalent to ``SLViTExit(config)``; inputs channels-last (B, H, W, C)."""
    keras = _keras()
    layers = keras.layers
    c = config
    (H, W), (ph, pw), (gh, gw) = c.feature_size, c.patch_size, c.grid
    features = keras.Input((H, W, c.in_channels), name="features")
    x = layers.Reshape((gh, ph, gw, pw, c.in_channels))(features)
    x = layers.Permute((1, 3, 2, 4, 5))(x)  # (gh, gw, ph, pw, C): row-major grid, (ph, pw, C) per patch
    x = layers.Reshape((c.num_patches, c.patch_dim), name="patches")(x)
    t = _patch_encoder_class()(c.num_patches, c.embed_dim, name="patch_encoder")(x)
    inputs = [features]
    if c.extra_tokens:
        extra = keras.Input((c.extra_tokens, c.extra_dim), name="extra")
        inputs.append(extra)
        t = layers.Concatenate(axis=1)([t, layers.Dense(c.embed_dim, name="extra_embed")(extra)])
    if c.dropout:
        t = layers.Dropout(c.dropout)(t)
    for i in range(c.num_layers):
        y = layers.LayerNormalization(epsilon=c.ln_eps, name=f"encoder{i}_norm1")(t)
        y = layers.MultiHeadAttention(c.num_heads, c.key_dim, dropout=c.attention_dropout, name=f"encoder{i}_attn")(y, y)
        t = layers.Add()([y, t])
        y = layers.LayerNormalization(epsilon=c.ln_eps, name=f"encoder{i}_norm2")(t)
        y = layers.Dense(c.mlp_dim, activation="gelu", name=f"encoder{i}_fc1")(y)
        if c.dropout:
            y = layers.Dropout(c.dropout)(y)
        y = layers.Dense(c.embed_dim, name=f"encoder{i}_fc2")(y)
        if c.dropout:
            y = layers.Dropout(c.dropout)(y)
        t = layers.Add()([y, t]) if c.mlp_residual else y
    f = layers.Flatten()(t)
    f = layers.Dense(c.head_hidden, activation=c.activation, name="head_fc1")(f)
    if c.head_dropout:
        f = layers.Dropout(c.head_dropout)(f)
    out = layers.Dense(c.num_outputs, name="head_fc2")(f)
    model = keras.Model(inputs if len(inputs) > 1 else features, out, name="slvit_exit")
    model.slvit_config = c  # read back by slvit_from_keras
    return model


def _weights(model: Any, layer_name: str, expected_count: int) -> list[np.ndarray]:
    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        raise CheckpointMismatchError(
            f"Keras model has no layer {layer_name!r}; layers: {[l.name for l in model.layers]}"
        ) from None
    arrays = layer.get_weights()
    if len(arrays) != expected_count:
        raise CheckpointMismatchError(f"Keras layer {layer_name!r} has {len(arrays)} weights, expected {expected_count}")
    return arrays


def slvit_from_keras(cls: type, keras_model: Any, config: SLViTConfig | None, backend: str):
    """Build ``cls(config)`` (an SLViTExit) with the weights of ``keras_model``."""
    config = config or getattr(keras_model, "slvit_config", None)
    if config is None:
        raise ValueError("pass config=SLViTConfig(...): the Keras model was not built by build_keras_slvit")
    c = config
    exit_module = cls(c, backend=backend)
    params = dict(exit_module.named_parameters())
    copies: dict[str, np.ndarray] = {}

    def dense(layer: str, prefix: str) -> None:
        kernel, bias = _weights(keras_model, layer, 2)
        copies[prefix + ".weight"], copies[prefix + ".bias"] = kernel.T, bias

    projection_kernel, projection_bias, positions = _weights(keras_model, "patch_encoder", 3)
    copies.update({"patch_embed.weight": projection_kernel.T, "patch_embed.bias": projection_bias, "pos_embed": positions})
    if c.extra_tokens:
        dense("extra_embed", "extra_embed")
    for i in range(c.num_layers):
        L, K = f"layers.{i}.", f"encoder{i}_"
        for norm in ("norm1", "norm2"):
            gamma, beta = _weights(keras_model, K + norm, 2)
            copies[L + norm + ".weight"], copies[L + norm + ".bias"] = gamma, beta
        qk, qb, kk, kb, vk, vb, ok, ob = _weights(keras_model, K + "attn", 8)
        for name, kernel, bias in (("q", qk, qb), ("k", kk, kb), ("v", vk, vb)):
            copies[L + f"attn.{name}.weight"] = kernel.reshape(kernel.shape[0], -1).T  # (d,h,kd) -> (h*kd, d)
            copies[L + f"attn.{name}.bias"] = bias.reshape(-1)
        copies[L + "attn.out.weight"] = ok.reshape(-1, ok.shape[-1]).T  # (h,kd,d) -> (d, h*kd)
        copies[L + "attn.out.bias"] = ob
        dense(K + "fc1", L + "mlp.fc1")
        dense(K + "fc2", L + "mlp.fc2")
    dense("head_fc1", "head.fc1")
    dense("head_fc2", "head.fc2")

    missing = sorted(set(params) - set(copies))
    if missing:
        raise CheckpointMismatchError(f"no Keras weights found for {missing}")
    with torch.no_grad():
        for name, array in copies.items():
            target = params[name]
            if tuple(array.shape) != tuple(target.shape):
                raise CheckpointMismatchError(
                    f"Keras weight for {name!r} has shape {tuple(array.shape)}, the exit expects "
                    f"{tuple(target.shape)} (config {c})"
                )
            target.copy_(torch.from_numpy(np.ascontiguousarray(array)).to(target.dtype))
    return exit_module
