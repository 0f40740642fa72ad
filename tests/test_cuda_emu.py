"""backend="cuda-emu": the CUDA kernel sources (csrc/cuda/slvit_kernels.cu) run under the SIMT emulator.

Forward (2 launches) and backward (2 launches: kernel + gradient reduction) kernels are both checked here.
Every CUDA thread is a host fiber here, so these runs are slow: batches of 1-3 and small channel counts.
The emulator must also be able to *catch* kernel bugs; the self-test kernels prove that.
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import (AWKWARD_CONFIGS, awkward_config, check_against_reference, check_nan_isolated, property_test,
                          randomize_, requires_half)
from slvit_fast import SLViTConfig, SLViTExit
from slvit_fast.backends import cuda_emu_backend
from slvit_fast.exit_presets import PRESETS
from slvit_fast.ops import cpp_ops
from slvit_fast.profiling import count_kernel_launches

reason = cuda_emu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"cuda-emu backend not built: {reason}")


# -- the emulator catches real bugs ---------------------------------------------------------------------
def test_selftest_reverse_with_sync_is_exact():
    x = torch.randn(200)
    out = torch.ops.slvit_fast.emu_selftest_reverse(x, 256, True)
    assert torch.equal(out, x.flip(0))


def test_missing_syncthreads_is_detected():
    """The same kernel compiled without its __syncthreads must give a wrong answer, every time."""
    x = torch.randn(200)
    for _ in range(3):
        out = torch.ops.slvit_fast.emu_selftest_reverse(x, 256, False)
        assert not torch.equal(out, x.flip(0))
        assert torch.isnan(out).any()  # reads of shared memory nobody wrote yet (poisoned with NaN)


def test_wrong_launch_configuration_is_detected():
    x = torch.randn(200)
    # too few threads for the data: elements stay unwritten (NaN-filled output) -> caught
    out = torch.ops.slvit_fast.emu_selftest_reverse(x, 128, True)
    assert torch.isnan(out[128:]).all() and not torch.equal(out, x.flip(0))
    # an impossible block size is rejected like the driver would
    with pytest.raises(RuntimeError, match="block size"):
        torch.ops.slvit_fast.emu_selftest_reverse(x, 2048, True)


def test_warp_shuffle_sum():
    x = torch.randn(300)
    out = torch.ops.slvit_fast.emu_selftest_warpsum(x)
    expected = torch.nn.functional.pad(x, (0, 20)).view(-1, 32).sum(1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# -- the exit kernels against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(AWKWARD_CONFIGS))
def test_awkward_fp32(name):
    check_against_reference("cuda-emu", awkward_config(name), 2, torch.float32)


def test_channels_last_batch3():
    check_against_reference("cuda-emu", awkward_config("grid16x9-h24-extra"), 3, torch.float32, channels_last=True)


@requires_half
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["N49-h8-kd36", "grid16x9-h24-extra"])
def test_half(name, dtype):
    check_against_reference("cuda-emu", awkward_config(name), 2, dtype)


@pytest.mark.parametrize("heads,key_dim", [(1, 64), (3, 8), (24, 4)])
def test_heads(heads, key_dim):
    check_against_reference("cuda-emu", awkward_config("N25-h1", num_heads=heads, key_dim=key_dim), 1,
                            torch.float32, backward=False)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_forward(preset):
    check_against_reference("cuda-emu", SLViTConfig(**PRESETS[preset].slvit_kwargs()), 1, torch.float32,
                            backward=False)


@pytest.mark.parametrize("preset", ["resnet152-b2-h24", "audiocsrnet-av1"])
def test_presets_backward(preset):
    """Backward kernel on full preset sizes (24 heads; 16x9 grid + audio token); slow in the emulator."""
    check_against_reference("cuda-emu", SLViTConfig(**PRESETS[preset].slvit_kwargs()), 1, torch.float32)


def test_two_layers_d64():
    check_against_reference("cuda-emu", awkward_config("N25-h1", num_layers=2, embed_dim=64, num_heads=2), 1,
                            torch.float32)


def test_magnitude_1e4():
    c = awkward_config("N49-h8-kd36")
    x = torch.randn(2, c.in_channels, *c.feature_size, dtype=torch.float64) * 1e4
    check_against_reference("cuda-emu", c, 2, torch.float32, x=x, backward=False)


def test_nan_propagates_per_sample():
    check_nan_isolated("cuda-emu", nan_at=(2, 1, 0, 0))


def test_forward_is_two_launches_backward_two():
    c = awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend="cuda-emu")).eval()
    with torch.no_grad(), count_kernel_launches() as launches:
        m(torch.randn(1, c.in_channels, *c.feature_size))
    assert launches.count == 2
    out = m(torch.randn(1, c.in_channels, *c.feature_size))
    with count_kernel_launches() as launches:
        out.sum().backward()
    assert launches.count == 2 and "slvit_fast.cuda.exit_backward" in launches.by_kernel  # + reduction


def test_backward_without_input_grad():
    """Exit training with a frozen backbone: x needs no gradient, every parameter does."""
    c = awkward_config("grid16x9-h24-extra", feature_size=(6, 8))
    m = randomize_(SLViTExit(c, backend="cuda-emu"))
    ref = randomize_(SLViTExit(c, backend="torch"))
    x = torch.randn(2, c.in_channels, *c.feature_size)
    e = torch.randn(2, c.extra_tokens, c.extra_dim)
    m(x, e).square().sum().backward()
    ref(x, e).square().sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_bad_inputs_are_clear_errors():
    c = awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend="cuda-emu"))
    x = torch.randn(1, c.in_channels, *c.feature_size)
    ps, cfg = cpp_ops.module_params(m), cpp_ops.config_ints(c)
    bad = list(ps)
    bad[0] = bad[0][:, :-1]
    with pytest.raises(RuntimeError, match="patch_embed.weight"):
        torch.ops.slvit_fast.emu_exit_forward(x, None, bad, cfg, c.ln_eps)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        torch.ops.slvit_fast.emu_exit_forward(x.double(), None, [p.double() for p in ps], cfg, c.ln_eps)
    with pytest.raises(RuntimeError, match="dtype|Float|Half"):
        torch.ops.slvit_fast.emu_exit_forward(x.half(), None, ps, cfg, c.ln_eps)
    too_deep = SLViTExit(awkward_config("N25-h1", num_layers=5), backend="cuda-emu")
    with pytest.raises(ValueError, match="num_layers"):
        too_deep(x)


def test_opcheck_emu_backward_op():
    c = awkward_config("nonsquare-patch", feature_size=(6, 8))
    m = randomize_(SLViTExit(c, backend="cuda-emu"))
    x = torch.randn(1, c.in_channels, *c.feature_size)
    ps = [p.detach() for p in cpp_ops.module_params(m)]
    g = torch.randn(1, c.num_outputs)
    torch.library.opcheck(torch.ops.slvit_fast.emu_exit_backward.default,
                          (g, x, None, ps, cpp_ops.config_ints(c), c.ln_eps, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_emu_op():
    c = awkward_config("nonsquare-patch", feature_size=(6, 8))
    m = randomize_(SLViTExit(c, backend="cuda-emu"))
    x = torch.randn(1, c.in_channels, *c.feature_size, requires_grad=True)
    ps = [p.detach().requires_grad_(True) for p in cpp_ops.module_params(m)]
    torch.library.opcheck(torch.ops.slvit_fast.emu_exit_forward.default,
                          (x, None, ps, cpp_ops.config_ints(c), c.ln_eps),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@property_test(max_examples=5, batch=(2, 2), max_grid=4, max_channels=4, dims=(4, 16, 36, 64), max_heads=4,
               key_dims=(None, 8, 40), extras=(0, 2))
def test_property_random_configs(config, batch, channels_last):
    check_against_reference("cuda-emu", config, batch, torch.float32, backward=False)
