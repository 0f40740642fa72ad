"""Fused dropout of the cpu training path (csrc/cpu/slvit_cpu.cpp, "dropout: counter-based masks").

``cpu_exit_forward``'s ``cfg`` may carry 4 more ints: keep thresholds ``round(rate * 2**32)`` for the
dropout, attention_dropout and head_dropout rates, and a seed. Element ``i`` (its index in the whole
batch's tensor) of dropout site ``s`` is kept iff ``lowbias32(i ^ key(seed, s)) >= threshold``; the
backward regenerates the same masks. These tests implement that mask rule independently in torch,
build the reference exit with exactly those masks in float64, and compare the output and every
gradient under every work split - which also shows the backward's masks equal the forward's.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cpu_train_splits import split_fixture
from kernel_cases import TOLERANCES, assert_paired_close, awkward_config, randomize_
from slvit_fast import SLViTConfig, SLViTExit, reference
from slvit_fast.backends import cpu_backend
from slvit_fast.exit_presets import PRESETS
from slvit_fast.ops import cpp_ops

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}")

M32 = 0xFFFFFFFF


def lowbias32(x):
    """C. Wellons' lowbias32 on Python ints or int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def keep_scale(shape, site: int, seed: int, rate: float) -> torch.Tensor:
    """The float64 dropout multiplier (0 or 1/(1-rate)) of a whole-batch tensor of ``shape``."""
    thr = round(rate * 2**32)
    n = math.prod(shape)
    assert n < 2**32
    base = lowbias32((seed & M32) ^ lowbias32((seed >> 32) ^ ((site * 0x9E3779B9) & M32)))
    key = lowbias32(0 ^ base)  # index high word is 0 here
    h = lowbias32(torch.arange(n, dtype=torch.int64) ^ key)
    return ((h >= thr).to(torch.float64) / (1.0 - rate)).reshape(shape)


def reference_with_masks(x, extra, params, c, seed):
    """reference.slvit_exit with the kernel's masks in place of F.dropout's (same places)."""
    p = reference.unpack_params(params, c)

    def mask(shape, site, seed, rate):
        return keep_scale(shape, site, seed, rate).to(x.dtype)

    t = reference.patch_embed(x, *p.embed, c.patch_size, extra, *(p.extra or (None, None)))
    B, T, d = t.shape
    t = t * mask((B, T, d), 0, seed, c.dropout)
    for l, (attn, mlp) in enumerate(zip(p.attention, p.mlp)):
        g1, b1, wq, bq, wk, bk, wv, bv, wo, bo = attn
        y = F.layer_norm(t, (d,), g1, b1, c.ln_eps)
        h, kd = c.num_heads, c.key_dim

        def heads(w, b):
            return F.linear(y, w, b).reshape(B, T, h, kd).transpose(1, 2)

        q, k, v = heads(wq, bq), heads(wk, bk), heads(wv, bv)
        probs = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(kd), dim=-1)
        probs = probs * mask((B, h, T, T), 2 + 3 * l, seed, c.attention_dropout)
        o = (probs @ v).transpose(1, 2).reshape(B, T, h * kd)
        t = t + F.linear(o, wo, bo)
        g2, b2, w1, c1, w2, c2 = mlp
        hid = F.gelu(F.linear(F.layer_norm(t, (d,), g2, b2, c.ln_eps), w1, c1))
        hid = hid * mask(hid.shape, 3 + 3 * l, seed, c.dropout)
        m = F.linear(hid, w2, c2) * mask((B, T, d), 4 + 3 * l, seed, c.dropout)
        t = t + m if c.mlp_residual else m
    w1, c1, w2, c2 = p.head
    a = reference.activation_fn(c.activation, F.linear(t.reshape(B, -1), w1, c1))
    a = a * mask(a.shape, 1, seed, c.head_dropout)
    return F.linear(a, w2, c2)


def dropout_cfg(c, seed):
    return cpp_ops.config_ints(c) + [round(c.dropout * 2**32), round(c.attention_dropout * 2**32),
                                     round(c.head_dropout * 2**32), seed]


def run_ours(m, x, extra, seed, grad_out, save=True):
    c = m.config
    ps = [p.detach().requires_grad_(True) for p in reference.module_params(m)]
    xi = x.clone().requires_grad_(True)
    ei = None if extra is None else extra.clone().requires_grad_(True)
    out = torch.ops.slvit_fast.cpu_exit_forward(xi, ei, ps, dropout_cfg(c, seed), c.ln_eps, save)[0]
    if not save:
        return out, []
    out.backward(grad_out)
    return out.detach(), [xi.grad] + ([ei.grad] if ei is not None else []) + [p.grad for p in ps]


def run_reference(m, x, extra, seed, grad_out, dtype=torch.float64):
    ps = [p.detach().to(dtype).requires_grad_(True) for p in reference.module_params(m)]
    xi = x.to(dtype).requires_grad_(True)
    ei = None if extra is None else extra.to(dtype).requires_grad_(True)
    out = reference_with_masks(xi, ei, ps, m.config, seed)
    out.backward(grad_out.to(dtype))
    return out.detach(), [xi.grad] + ([ei.grad] if ei is not None else []) + [p.grad for p in ps]


def close(name, ours, ref32, ref64):
    """The shared paired tolerance: ours may err a few times what the float32 reference errs."""
    assert_paired_close(name, ours, ref32, ref64, TOLERANCES[torch.float32])


# (threads, samples per chunk, AVX2 kernels of the ATen path, training path): cpu_train_splits.py
SPLITS = [(1, None, None), (2, None, None), (2, 2, None), (2, 2, None, "avx2"), (2, 2, "gelu,attn", "off"),
          (1, None, "none", "off")]


split = split_fixture(SPLITS)


RATES = dict(dropout=0.1, attention_dropout=0.2, head_dropout=0.3)


@pytest.mark.parametrize("name,layers", [("N25-h1", 1), ("grid16x9-h24-extra", 1), ("N49-nores-relu", 2),
                                         ("nonsquare-patch", 1)])
@pytest.mark.parametrize("batch", [1, 5])
def test_forward_and_every_gradient_with_the_same_masks(name, layers, batch, split):
    check_same_masks(awkward_config(name, num_layers=layers, **RATES), batch)


def test_preset_size_with_the_same_masks(split):
    """A paper-size exit (1568-wide head input, 1024-wide MLP, 12 heads): masks indexed past the small cases."""
    check_same_masks(SLViTConfig(**{**PRESETS["resnet152-b1"].slvit_kwargs(), **RATES}), 5)


def inputs(c, batch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c.in_channels, *c.feature_size, generator=g)
    extra = torch.randn(batch, c.extra_tokens, c.extra_dim, generator=g) if c.extra_tokens else None
    return x, extra, torch.randn(batch, c.num_outputs, generator=g)


def check_same_masks(c, batch, seed=0x1234_5678_9ABC):
    m = randomize_(SLViTExit(c, backend="cpu"))
    x, extra, grad_out = inputs(c, batch)
    out, grads = run_ours(m, x, extra, seed, grad_out)
    compare_with_reference(m, x, extra, seed, grad_out, out, grads)


def compare_with_reference(m, x, extra, seed, grad_out, out, grads):
    """``out`` / ``grads`` (x, extra, then every parameter in op order) against the reference with the
    kernel's masks for ``seed``, float64, at the paired tolerance."""
    ref, ref_grads = run_reference(m, x, extra, seed, grad_out)
    ref32, ref32_grads = run_reference(m, x, extra, seed, grad_out, torch.float32)
    close("output", out, ref32, ref)
    names = ["x"] + (["extra"] if extra is not None else []) + reference.param_names(m.config)
    assert len(grads) == len(names) == len(ref_grads)
    for n, a, b32, b in zip(names, grads, ref32_grads, ref_grads):
        close(f"grad {n}", a, b32, b)


@pytest.mark.parametrize("name,layers", [("grid16x9-h24-extra", 1), ("N49-nores-relu", 2)])
def test_module_dropout_uses_config_rates_and_torch_seed(name, layers):
    """Through the module (SLViTExit.forward -> cpu_backend): in training mode the op gets the config's three
    rates in their own slots and a seed drawn from torch's default generator (one
    ``torch.randint(0, 2**62)`` per call, so ``torch.manual_seed`` reproduces a step). The rates differ
    (0.1 / 0.2 / 0.3), so rates in the wrong slots, a seed not from torch's generator, or masks that
    differ between forward and backward fail on the output or a gradient."""
    c = awkward_config(name, num_layers=layers, **RATES)
    m = randomize_(SLViTExit(c, backend="cpu")).train()
    x, extra, grad_out = inputs(c, 3)
    xi = x.clone().requires_grad_(True)
    ei = None if extra is None else extra.clone().requires_grad_(True)
    torch.manual_seed(1234)
    out = m(xi, ei)
    out.backward(grad_out)
    grads = [xi.grad] + ([ei.grad] if ei is not None else []) + [p.grad for p in reference.module_params(m)]
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # the draw the module made
    compare_with_reference(m, x, extra, seed, grad_out, out.detach(), grads)


def test_masks_are_reproducible_and_follow_the_seed():
    c = awkward_config("N49-h8-kd36", **RATES)
    m = randomize_(SLViTExit(c, backend="cpu"))
    x = torch.randn(4, c.in_channels, *c.feature_size)
    g = torch.randn(4, c.num_outputs)
    out1, grads1 = run_ours(m, x, None, 7, g)
    out2, grads2 = run_ours(m, x, None, 7, g)
    out3, _ = run_ours(m, x, None, 8, g)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2))
    assert not torch.allclose(out1, out3)
    # without save (no autograd) the same masks apply
    with torch.no_grad():
        out4, _ = run_ours(m, x, None, 7, g, save=False)
    torch.testing.assert_close(out4, out1, rtol=1e-6, atol=1e-6)
    # about `rate` of the elements are dropped
    for rate in (0.1, 0.5):
        kept = (keep_scale((200_000,), 3, 7, rate) > 0).double().mean().item()
        assert abs(kept - (1 - rate)) < 0.01


def test_zero_rates_equal_the_plain_op():
    c = awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend="cpu"))
    x = torch.randn(3, c.in_channels, *c.feature_size)
    ps = reference.module_params(m)
    with torch.no_grad():
        plain = torch.ops.slvit_fast.cpu_exit_forward(x, None, ps, cpp_ops.config_ints(c), c.ln_eps, True)[0]
        zero = torch.ops.slvit_fast.cpu_exit_forward(x, None, ps, cpp_ops.config_ints(c) + [0, 0, 0, 99], c.ln_eps,
                                                     True)[0]
    assert torch.equal(plain, zero)


def test_bad_threshold_is_an_error():
    c = awkward_config("N25-h1")
    m = SLViTExit(c, backend="cpu")
    x = torch.randn(1, c.in_channels, *c.feature_size)
    with pytest.raises(RuntimeError, match="dropout threshold"):
        torch.ops.slvit_fast.cpu_exit_forward(x, None, reference.module_params(m),
                                              cpp_ops.config_ints(c) + [-1, 0, 0, 1], c.ln_eps, True)
