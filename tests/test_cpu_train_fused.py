"""What is specific to the fused training path of backend "cpu" (csrc/cpu/slvit_cpu.cpp, fused_train.cpp).

The fused path (default on AVX2+FMA CPUs; ``SLVIT_FAST_CPU_TRAIN_FUSED=0`` selects the ATen/BLAS path) runs
the training forward and backward on the inference kernels' GEMM tiles and does not save the patch
matrix or the MLP hidden activations (both backwards gather / recompute them; the saved list keeps the
fake implementation's count and shapes). tests/test_cpu_train.py and tests/test_cpu_train_dropout.py run the shared shape matrix under
both paths and both ISAs; this file adds the cases those do not: gradients with x not requiring grad
(exit training on cached features), batch 64 of the paper preset, the saved list against the fake
implementation, a forward of one path followed by the backward of the other, the save-everything knob,
the saved-tensor pool and the switch's values.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cpu_train_splits import split_fixture
from kernel_cases import TOLERANCES, assert_paired_close, awkward_config, randomize_
from slvit_fast import SLViTConfig, SLViTExit
from slvit_fast.backends import cpu_backend
from slvit_fast.exit_presets import PRESETS
from slvit_fast.ops import cpp_ops

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = [
    pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}"),
    pytest.mark.skipif(not has_avx2, reason="the fused CPU training path needs AVX2+FMA"),
]

FUSED = "SLVIT_FAST_CPU_TRAIN_FUSED"

# (threads, samples per chunk, ATen-path kernels, training path): cpu_train_splits.py
SPLITS = [(1, None, None, "avx2"), (2, 2, None, "avx2"), (2, None, None, "avx512")]
split = split_fixture(SPLITS)


def param_grads(m, x, extra, grad_out):
    """Output and parameter gradients of module m with x (and extra) NOT requiring grad."""
    m.zero_grad(set_to_none=True)
    out = m(x, extra)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), {n: p.grad for n, p in m.named_parameters()}


def check_param_grads(config, batch, channels_last=False, seed=0):
    base = randomize_(SLViTExit(config, backend="torch").double(), seed).train()
    ref32 = copy.deepcopy(base).float()
    ours = copy.deepcopy(base).float()
    ours.backend = "cpu"
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, config.in_channels, *config.feature_size, generator=g, dtype=torch.float64)
    extra = (torch.randn(batch, config.extra_tokens, config.extra_dim, generator=g, dtype=torch.float64)
             if config.extra_tokens else None)
    grad_out = torch.randn(batch, config.num_outputs, generator=g, dtype=torch.float64)

    def inputs(dt):
        xi = x.to(dt)
        if channels_last:
            xi = xi.contiguous(memory_format=torch.channels_last)
        return xi, None if extra is None else extra.to(dt)

    out64, g64 = param_grads(base, *inputs(torch.float64), grad_out)
    out32, g32 = param_grads(ref32, *inputs(torch.float32), grad_out)
    out, gours = param_grads(ours, *inputs(torch.float32), grad_out)
    tol = TOLERANCES[torch.float32]
    assert_paired_close("output", out, out32, out64, tol)
    for name in g64:
        assert_paired_close(f"grad {name}", gours[name], g32[name], g64[name], tol)


@pytest.mark.parametrize("name", ["N25-h1", "grid16x9-h24-extra", "N49-nores-relu", "nonsquare-patch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_parameter_gradients_with_x_not_requiring_grad(name, channels_last, split):
    check_param_grads(awkward_config(name, num_layers=2 if name == "N49-nores-relu" else 1), 7, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_paper_preset_batch_64(channels_last, split):
    """The benchmark case: resnet152-b1 at batch 64 (several chunks per worker), x from a feature cache."""
    check_param_grads(SLViTConfig(**PRESETS["resnet152-b1"].slvit_kwargs()), 64, channels_last)


def _op_case(name="N49-h8-kd36", batch=5, **kw):
    c = awkward_config(name, **kw)
    m = randomize_(SLViTExit(c, backend="cpu"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, c.in_channels, *c.feature_size, generator=g)
    extra = torch.randn(batch, c.extra_tokens, c.extra_dim, generator=g) if c.extra_tokens else None
    return c, m, x, extra, torch.randn(batch, c.num_outputs, generator=g)


def _fwd_bwd(c, m, x, extra, grad_out, fwd_env: dict, bwd_env: dict, monkeypatch):
    ps = [p.detach().clone() for p in cpp_ops.module_params(m)]
    cfg = cpp_ops.config_ints(c)
    for k, v in fwd_env.items():
        monkeypatch.setenv(k, v)
    res = torch.ops.slvit_fast.cpu_exit_forward(x, extra, ps, cfg, c.ln_eps, True)
    for k, v in bwd_env.items():
        monkeypatch.setenv(k, v)
    grads = torch.ops.slvit_fast.cpu_exit_backward(grad_out, x, extra, ps, list(res[1:]), cfg, c.ln_eps, True)
    return res[0], grads


def test_saved_list_matches_the_fake_implementation(monkeypatch):
    for name in ("N49-h8-kd36", "grid16x9-h24-extra"):
        c, m, x, extra, _ = _op_case(name, num_layers=2)
        for path in ("1", "0"):
            monkeypatch.setenv(FUSED, path)
            with torch.no_grad():
                res = torch.ops.slvit_fast.cpu_exit_forward(x, extra, cpp_ops.module_params(m), cpp_ops.config_ints(c),
                                                            c.ln_eps, True)
            fake = cpp_ops._fake_saved(x, cpp_ops.config_ints(c))
            assert [tuple(t.shape) for t in res[1:]] == [tuple(t.shape) for t in fake], (name, path)
            assert all(t.dtype == f.dtype and t.is_contiguous() for t, f in zip(res[1:], fake)), (name, path)


def test_saved_list_is_a_function_of_the_inputs_and_survives_copies(monkeypatch):
    """Two forwards return equal saved lists (what is left to the backward reads as zeros; opcheck compares
    them), and the backward of copies of the saved tensors (no allocation slack, the fused path's mark in
    the values) gives the same gradients."""
    monkeypatch.setenv(FUSED, "1")
    c, m, x, extra, g = _op_case("grid16x9-h24-extra", num_layers=2)
    ps, cfg = [p.detach() for p in cpp_ops.module_params(m)], cpp_ops.config_ints(c)
    with torch.no_grad():
        a = torch.ops.slvit_fast.cpu_exit_forward(x, extra, ps, cfg, c.ln_eps, True)
        b = torch.ops.slvit_fast.cpu_exit_forward(x, extra, ps, cfg, c.ln_eps, True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    base = torch.ops.slvit_fast.cpu_exit_backward(g, x, extra, ps, list(a[1:]), cfg, c.ln_eps, True)
    for path in ("1", "0"):
        monkeypatch.setenv(FUSED, path)
        copied = torch.ops.slvit_fast.cpu_exit_backward(g, x, extra, ps, [t.clone() for t in a[1:]], cfg, c.ln_eps,
                                                        True)
        for u, v in zip(copied, base):
            scale = v.abs().max().item() if v.numel() else 0.0
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6 * scale + 1e-6)


@pytest.mark.parametrize("fwd,bwd", [("1", "0"), ("0", "1")], ids=["fused-then-aten", "aten-then-fused"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_forward_of_one_path_backward_of_the_other(fwd, bwd, channels_last, monkeypatch):
    """The saved set says whether patches, Q/K/V and the MLP hidden activations were saved (the fused forward
    marks it): a backward of either path after a forward of either path gives the same gradients."""
    c, m, x, extra, g = _op_case("grid16x9-h24-extra")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out_a, grads_a = _fwd_bwd(c, m, x, extra, g, {FUSED: fwd}, {FUSED: bwd}, monkeypatch)
    out_b, grads_b = _fwd_bwd(c, m, x, extra, g, {FUSED: "0"}, {FUSED: "0"}, monkeypatch)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (b.abs().max().item() + 1e-30) + 1e-7)


@pytest.mark.parametrize("name", ["N25-h1", "N49-nores-relu"])
def test_saving_everything_gives_the_same_gradients(name, monkeypatch):
    """SLVIT_FAST_CPU_TRAIN_SAVE_ALL=1 saves the patches and MLP hidden activations instead of recomputing them
    (recomputed: GELU in fc1's epilogue forward, the elementwise GELU backward: ~1 ulp apart)."""
    c, m, x, extra, g = _op_case(name, num_layers=2, dropout=0.1)
    seeded = cpp_ops.config_ints(c) + [round(0.1 * 2**32), 0, 0, 5]
    ps = [p.detach().clone() for p in cpp_ops.module_params(m)]

    def run(save_all):
        monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_SAVE_ALL", save_all)
        res = torch.ops.slvit_fast.cpu_exit_forward(x, extra, ps, seeded, c.ln_eps, True)
        return [res[0], *torch.ops.slvit_fast.cpu_exit_backward(g, x, extra, ps, list(res[1:]), seeded, c.ln_eps, True)]

    for a, b in zip(run("0"), run("1")):
        scale = b.abs().max().item() if b.numel() else 0.0
        # (some gradients are round-off around an exact 0, e.g. the key bias under softmax: absolute floor)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale + 1e-6)


def test_pool_off_and_bad_pool_value(monkeypatch):
    c, m, x, extra, g = _op_case("N25-h1")
    base = _fwd_bwd(c, m, x, extra, g, {FUSED: "1"}, {}, monkeypatch)
    off = _fwd_bwd(c, m, x, extra, g, {"SLVIT_FAST_CPU_TRAIN_POOL_MB": "0"}, {}, monkeypatch)
    for a, b in zip([base[0], *base[1]], [off[0], *off[1]]):
        assert torch.equal(a, b)
    monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_POOL_MB", "lots")
    with pytest.raises(RuntimeError, match="SLVIT_FAST_CPU_TRAIN_POOL_MB.*'lots'"):
        torch.ops.slvit_fast.cpu_exit_forward(x, None, cpp_ops.module_params(m), cpp_ops.config_ints(c), c.ln_eps, True)


@pytest.mark.parametrize("value,fused", [("", True), ("on", True), (" TRUE ", True), ("0", False), ("Off", False)])
def test_switch_values(value, fused, monkeypatch):
    """The ATen path saves the gathered patches; the fused path leaves them (and Q/K/V, the MLP hidden
    activations) to the backward: garbage there changes nothing."""
    monkeypatch.setenv(FUSED, value)
    c, m, x, extra, g = _op_case("N25-h1")
    ps, cfg = [p.detach() for p in cpp_ops.module_params(m)], cpp_ops.config_ints(c)
    res = torch.ops.slvit_fast.cpu_exit_forward(x, None, ps, cfg, c.ln_eps, True)
    patches = torch.nn.functional.unfold(x, c.patch_size, stride=c.patch_size)  # (B, C*ph*pw, Np) in (C, ph, pw)
    if not fused:
        assert torch.equal(res[1], patches.transpose(1, 2).reshape(res[1].shape))
        return
    base = torch.ops.slvit_fast.cpu_exit_backward(g, x, None, ps, list(res[1:]), cfg, c.ln_eps, True)
    for k in (1, 1 + 1 + 4, 1 + 1 + 11, 1 + 1 + 12):  # patches, qkv, hpre, hact: not read by the backward
        res[k].fill_(float("nan"))
    again = torch.ops.slvit_fast.cpu_exit_backward(g, x, None, ps, list(res[1:]), cfg, c.ln_eps, True)
    for a, b in zip(base, again):
        assert torch.equal(a, b)


def test_bad_switch_value_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv(FUSED, "fast")
    c, m, x, extra, g = _op_case("N25-h1")
    with pytest.raises(RuntimeError, match="SLVIT_FAST_CPU_TRAIN_FUSED='fast'"):
        torch.ops.slvit_fast.cpu_exit_forward(x, None, cpp_ops.module_params(m), cpp_ops.config_ints(c), c.ln_eps, True)
