"""backend="cpu" (fused C++ CPU kernels, csrc/cpu/) against the torch reference: forward and every gradient."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_cases import (AWKWARD_CONFIGS, TOLERANCES, awkward_config, check_against_reference, check_nan_isolated,
                          property_test, randomize_, requires_half)
from slvit_fast import SLViTConfig, SLViTExit, reference
from slvit_fast.backends import cpu_backend
from slvit_fast.exit_presets import PRESETS
from slvit_fast.ops import cpp_ops

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}")


@pytest.mark.parametrize("name", list(AWKWARD_CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_awkward_fp32(name, batch):
    check_against_reference("cpu", awkward_config(name), batch, torch.float32)


@pytest.mark.parametrize("name", ["N49-h8-kd36", "grid16x9-h24-extra", "nonsquare-patch"])
def test_channels_last(name):
    check_against_reference("cpu", awkward_config(name), 3, torch.float32, channels_last=True)


@requires_half
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(AWKWARD_CONFIGS))
def test_awkward_half(name, dtype):
    check_against_reference("cpu", awkward_config(name), 3, dtype)


@pytest.mark.parametrize("heads", [1, 2, 5, 12, 24])
def test_heads(heads):
    check_against_reference("cpu", awkward_config("N25-h1", num_heads=heads, key_dim=8), 2, torch.float32)


def test_batch_64():
    check_against_reference("cpu", awkward_config("N49-h8-kd36"), 64, torch.float32)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets(preset):
    p = PRESETS[preset]
    kwargs = p.slvit_kwargs()
    check_against_reference("cpu", SLViTConfig(**kwargs), 2, torch.float32)


def test_two_layers():
    check_against_reference("cpu", awkward_config("N25-h1", num_layers=2), 2, torch.float32)


@pytest.mark.parametrize("scale", [1e4, 1e-4])
def test_magnitudes(scale):
    c = awkward_config("N49-h8-kd36")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, c.in_channels, *c.feature_size, generator=g, dtype=torch.float64) * scale
    check_against_reference("cpu", c, 3, torch.float32, x=x)


def test_nan_propagates_per_sample():
    check_nan_isolated("cpu")


def test_auto_prefers_cpu():
    m = SLViTExit(awkward_config("N25-h1"))
    assert m.active_backend(torch.randn(1, 6, 10, 10)) == "cpu"


def test_no_grad_for_x_skips_dx():
    c = awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend="cpu"))
    x = torch.randn(2, c.in_channels, *c.feature_size)
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_inference_needs_no_saved_activations():
    c = awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend="cpu"))
    x = torch.randn(2, c.in_channels, *c.feature_size)
    ps, cfg = cpp_ops.module_params(m), cpp_ops.config_ints(c)
    with torch.no_grad():
        assert len(torch.ops.slvit_fast.cpu_exit_forward(x, None, ps, cfg, c.ln_eps, False)) == 1
        assert len(torch.ops.slvit_fast.cpu_exit_forward(x, None, ps, cfg, c.ln_eps, True)) > 1


def test_dropout_training_runs_fused_and_reproducible():
    """Training with dropout stays on the fused op (no reference fallback warning), draws its mask seed from
    torch's generator (same seed -> same output and gradients), drops something, and keeps eval exact."""
    import warnings

    c = awkward_config("N25-h1", dropout=0.1, attention_dropout=0.1, head_dropout=0.1)
    m = randomize_(SLViTExit(c, backend="cpu")).train()
    x = torch.randn(3, c.in_channels, *c.feature_size)

    def run(seed):
        m.zero_grad()
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the reference fallback warns; the fused path must not
            out = m(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters()]

    a, ga = run(1)
    b, gb = run(1)
    c2, _ = run(2)
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert not torch.equal(a, c2)
    ref = reference.slvit_exit(x, cpp_ops.module_params(m), c, None)  # no dropout
    assert not torch.allclose(a, ref, atol=1e-4)
    m.eval()
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)


# -- bad input: clear errors, never a crash inside a kernel ---------------------------------------------
def _op_args(c=None):
    c = c or awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend="cpu"))
    x = torch.randn(2, c.in_channels, *c.feature_size)
    return m, x, cpp_ops.module_params(m), cpp_ops.config_ints(c), c.ln_eps


def test_op_rejects_wrong_param_shape():
    m, x, ps, cfg, eps = _op_args()
    ps[5] = torch.randn(3, 3)
    with pytest.raises(RuntimeError, match="attn.q"):
        torch.ops.slvit_fast.cpu_exit_forward(x, None, ps, cfg, eps, False)


def test_op_rejects_wrong_param_count_and_shapes():
    m, x, ps, cfg, eps = _op_args()
    with pytest.raises(RuntimeError, match="parameters"):
        torch.ops.slvit_fast.cpu_exit_forward(x, None, ps[:-1], cfg, eps, False)
    with pytest.raises(RuntimeError, match="not divisible"):
        torch.ops.slvit_fast.cpu_exit_forward(x[..., :9], None, ps, cfg, eps, False)
    with pytest.raises(RuntimeError, match="extra"):
        torch.ops.slvit_fast.cpu_exit_forward(x, torch.randn(2, 1, 3), ps, cfg, eps, False)
    with pytest.raises(RuntimeError, match="floating"):
        torch.ops.slvit_fast.cpu_exit_forward(x.long(), None, ps, cfg, eps, False)
    with pytest.raises(RuntimeError, match="cfg"):
        torch.ops.slvit_fast.cpu_exit_forward(x, None, ps, cfg[:-1], eps, False)


def test_module_rejects_bad_input():
    m, x, *_ = _op_args()
    with pytest.raises(Exception, match="channels"):
        m(torch.randn(2, 5, 10, 10))
    with pytest.raises(TypeError, match="dtype"):
        m(x.double())


# -- torch.library integration -------------------------------------------------------------------------
def test_opcheck_forward_and_backward():
    m, x, ps, cfg, eps = _op_args()
    ps = [p.detach().requires_grad_(True) for p in ps]
    x = x.requires_grad_(True)
    torch.library.opcheck(torch.ops.slvit_fast.cpu_exit_forward.default, (x, None, ps, cfg, eps, True))
    torch.library.opcheck(torch.ops.slvit_fast.cpu_exit_forward.default, (x.detach(), None,
                                                                         [p.detach() for p in ps], cfg, eps, False))
    with torch.no_grad():
        res = torch.ops.slvit_fast.cpu_exit_forward(x, None, ps, cfg, eps, True)
    g = torch.randn_like(res[0])
    torch.library.opcheck(torch.ops.slvit_fast.cpu_exit_backward.default,
                          (g, x.detach(), None, [p.detach() for p in ps], list(res[1:]), cfg, eps, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_with_extra_tokens():
    c = awkward_config("grid16x9-h24-extra", feature_size=(6, 8))
    m = randomize_(SLViTExit(c, backend="cpu"))
    x = torch.randn(2, c.in_channels, *c.feature_size, requires_grad=True)
    e = torch.randn(2, c.extra_tokens, c.extra_dim, requires_grad=True)
    ps = [p.detach().requires_grad_(True) for p in cpp_ops.module_params(m)]
    torch.library.opcheck(torch.ops.slvit_fast.cpu_exit_forward.default,
                          (x, e, ps, cpp_ops.config_ints(c), c.ln_eps, True))


def test_torch_compile_fullgraph_forward_backward():
    """The C++ ops under torch.compile(fullgraph=True): forward and backward through register_autograd."""
    c = awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend="cpu"))
    ref = randomize_(SLViTExit(c, backend="torch"))
    x = torch.randn(2, c.in_channels, *c.feature_size, requires_grad=True)
    params = cpp_ops.module_params(m)
    cfg = cpp_ops.config_ints(c)

    def step(inp, ps):
        out = torch.ops.slvit_fast.cpu_exit_forward(inp, None, ps, cfg, c.ln_eps, True)[0]
        return out, out.square().sum()

    for backend in ("aot_eager", "inductor"):
        m.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        x.grad = None
        out, loss = torch.compile(step, fullgraph=True, backend=backend)(x, params)
        loss.backward()
        dx = x.grad
        x.grad = None
        out_ref = ref(x)
        out_ref.square().sum().backward()
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, x.grad, rtol=1e-4, atol=1e-5)
        for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


# -- property test ----------------------------------------------------------------------------------------
@property_test(max_examples=12, batch=(1, 4), channels_last=True)
def test_property_random_configs(config, batch, channels_last):
    check_against_reference("cpu", config, batch, torch.float32, channels_last=channels_last)


def test_tolerance_table_is_the_shared_one():
    # guards against silently loosening: fp32 must stay within 8x the reference's own error
    assert TOLERANCES[torch.float32].factor <= 8 and math.isclose(TOLERANCES[torch.float32].floor, 2e-6)


def test_dropout_under_compile_and_trace_is_not_frozen():
    """With dropout on, torch.compile must not recompile per step (the per-call seed) and a jit trace must
    not freeze one mask: both run the reference ops' dropout."""
    import warnings

    c = awkward_config("N25-h1", dropout=0.1)
    m = randomize_(SLViTExit(c, backend="cpu")).train()
    x = torch.randn(2, c.in_channels, *c.feature_size)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(m, backend=count)
    for _ in range(10):
        f(x).sum().backward()
    assert len(graphs) <= 3, f"{len(graphs)} graphs compiled in 10 steps (recompiling per step)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, (x,), check_trace=False)
    assert not torch.equal(traced(x), traced(x))
