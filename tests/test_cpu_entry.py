"""The batch-1 entry point of backend "cpu" (``_C_cpu.exit_infer``, csrc/cpu/module_cpu.cpp).

It keeps each module's validated parameter pointers between calls, keyed on every parameter's tensor,
data pointer, version counter, dtype, shape and strides. These tests change the weights in every way a
user can between calls - in place under no_grad, an optimizer step, ``load_state_dict``, a replaced
Parameter, a replaced submodule, ``.data =``, ``.to()`` round trips - and check each output against the
reference, and that the entry point (not the op path) produced it. Also: it declines (None) exactly when
the op path must run, and the fused kernels' fewer-barrier team layout equals the old one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kernel_cases import awkward_config, randomize_
from slvit_fast import SLViTConfig, SLViTExit
from slvit_fast.backends import cpu_backend
from slvit_fast.exit_presets import PRESETS

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = [
    pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}"),
    pytest.mark.skipif(not has_avx2, reason="the fused CPU kernels need AVX2+FMA"),
]

if reason is None:
    from slvit_fast import _C_cpu


def stats():
    fast, validated, declined = _C_cpu.entry_stats()
    return fast, validated


def pair(config, seed=0):
    ours = randomize_(SLViTExit(config, backend="cpu"), seed).eval()
    ref = SLViTExit(config, backend="torch").eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def check(ours, ref, x, extra=None, expect_validation=None):
    """ours(x) == ref(x), produced by the entry point; `expect_validation`: whether it re-validated."""
    f0, v0 = stats()
    with torch.no_grad():
        ref.load_state_dict(ours.state_dict())
        out, expected = ours(x, extra), ref(x, extra)
    f1, v1 = stats()
    assert f1 == f0 + 1, "the call did not take the entry point"
    if expect_validation is not None:
        assert (v1 == v0 + 1) == expect_validation, f"validations {v0} -> {v1}"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    return out


def test_weights_changed_between_calls_are_always_seen(threads):
    c = awkward_config("N49-h8-kd36")
    m, ref = pair(c)
    x = torch.randn(1, c.in_channels, *c.feature_size)
    first = check(m, ref, x)
    check(m, ref, x, expect_validation=False)  # unchanged: the kept pointers are reused

    with torch.no_grad():  # in-place update (version bump, same storage)
        m.layers[0].attn.q.weight.mul_(1.5)
    changed = check(m, ref, x, expect_validation=True)
    assert not torch.allclose(changed, first)

    # an optimizer step (training-mode forward/backward through the op path, then in-place updates)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.train()
    m(x).square().sum().backward()
    opt.step()
    m.eval()
    check(m, ref, x, expect_validation=True)

    other = randomize_(SLViTExit(c, backend="cpu"), seed=5)
    m.load_state_dict(other.state_dict())  # in-place copy_ of every tensor
    check(m, ref, x, expect_validation=True)

    # a replaced Parameter object (old storage freed) and a replaced submodule
    m.layers[0].mlp.fc1.weight = nn.Parameter(torch.randn_like(m.layers[0].mlp.fc1.weight) * 0.2)
    check(m, ref, x, expect_validation=True)
    new_head = nn.Linear(c.head_hidden, c.num_outputs)
    m.head.fc2 = new_head
    check(m, ref, x, expect_validation=True)

    with torch.no_grad():  # .data = (new storage under the same Parameter)
        m.patch_embed.weight.data = torch.randn_like(m.patch_embed.weight) * 0.1
    check(m, ref, x, expect_validation=True)

    m.to(torch.float64).to(torch.float32)  # .to() round trip: every tensor replaced
    check(m, ref, x, expect_validation=True)

    y = torch.randn(3, c.in_channels, *c.feature_size)  # another batch size: same pointers
    check(m, ref, y, expect_validation=False)


def test_two_modules_and_extra_tokens():
    c1, c2 = awkward_config("N25-h1"), awkward_config("grid16x9-h24-extra")
    m1, r1 = pair(c1, 1)
    m2, r2 = pair(c2, 2)
    x1 = torch.randn(2, c1.in_channels, *c1.feature_size)
    x2 = torch.randn(2, c2.in_channels, *c2.feature_size)
    e2 = torch.randn(2, c2.extra_tokens, c2.extra_dim)
    for _ in range(2):
        check(m1, r1, x1)
        check(m2, r2, x2, e2)
    clone = copy.deepcopy(m1)  # a copy has its own tensors
    with torch.no_grad():
        clone.head.fc1.bias.add_(1.0)
    check(clone, r1, x1)
    check(m1, r1, x1, expect_validation=False)


def new_exit_at_a_freed_address(config, freed: set, tries: int = 5000) -> SLViTExit:
    """A new SLViTExit whose object sits at one of the ``freed`` addresses when the allocator allows: bare
    objects are allocated (``SLViTExit(...)``'s first step, ``__new__``) and held until one lands on a freed
    address, which is then initialized - the case made certain instead of left to the allocator's mood."""
    held = []
    m = SLViTExit.__new__(SLViTExit)
    while freed and id(m) not in freed and len(held) < tries:
        held.append(m)
        m = SLViTExit.__new__(SLViTExit)
    m.__init__(config, backend="cpu")
    return m


def test_new_module_at_a_freed_address_gets_its_own_weights(one_thread):
    """The entry's cache is keyed on the module object's address (checked against a weak reference): a new
    module at a freed module's address - whose parameters may also sit in the old tensors' memory, with
    the same versions - must be validated afresh and compute with its own weights. Rounds alternate a
    config with the same shapes (much of a key could match) and one with other shapes."""
    import gc
    import weakref

    cycle = [awkward_config("N25-h1"), awkward_config("N25-h1"), awkward_config("N49-h8-kd36")]
    xs = [torch.randn(1, c.in_channels, *c.feature_size) for c in cycle]
    freed, reused, last = set(), 0, {}
    for i in range(20):
        c, x = cycle[i % 3], xs[i % 3]
        m = randomize_(new_exit_at_a_freed_address(c, freed), seed=i).eval()
        ref = SLViTExit(c, backend="torch").eval()  # check() loads m's weights into it
        reused += id(m) in freed
        out = check(m, ref, x, expect_validation=True)
        shape = c.feature_size
        assert shape not in last or not torch.allclose(out, last[shape]), f"round {i}: an earlier exit's output"
        last[shape] = out
        f0, v0 = stats()  # its entry is kept while it lives: no re-validation, the same bits
        with torch.no_grad():
            assert torch.equal(m(x), out) and stats() == (f0 + 1, v0)
        freed.add(id(m))
        alive = weakref.ref(m)
        del m, ref
        if alive() is not None:  # freed by its reference count so far; a full collection costs ~0.1 s a round
            gc.collect()
        assert alive() is None
    assert reused >= 10, f"only {reused} of 20 exits were built at a freed exit's address: the case was not tested"


def test_data_copy_without_version_bump_is_seen():
    """``p.data.copy_(w)`` on an ordinary Parameter bumps no version counter the entry's key sees (``.data``
    has its own), so the key still matches: the kept pointers must read the new values."""
    c = awkward_config("N49-h8-kd36")
    m, ref = pair(c)
    x = torch.randn(1, c.in_channels, *c.feature_size)
    before = check(m, ref, x)
    for p in (m.patch_embed.weight, m.layers[0].attn.q.weight, m.layers[0].mlp.fc2.bias, m.head.fc1.weight):
        version = p._version
        p.data.copy_(torch.randn_like(p) * 0.3)
        assert p._version == version  # the case under test: no version bump
        after = check(m, ref, x, expect_validation=False)  # same key: not re-validated, yet the new values
        assert not torch.allclose(after, before)
        before = after


def test_declines_when_the_op_path_must_run():
    from torch.utils.flop_counter import FlopCounterMode

    c = awkward_config("N25-h1")
    m, _ = pair(c)
    x = torch.randn(2, c.in_channels, *c.feature_size)
    with torch.no_grad():
        assert _C_cpu.exit_infer(m, x, None) is not None
        assert _C_cpu.exit_infer(m, x.double(), None) is None  # not float32
        assert _C_cpu.exit_infer(m, x.to("meta"), None) is None
        with FlopCounterMode(display=False):  # a dispatch mode must see the op
            assert _C_cpu.exit_infer(m, x, None) is None
        md, _ = pair(awkward_config("N25-h1", dropout=0.1))
        md.train()
        assert _C_cpu.exit_infer(md, x, None) is None  # dropout active: the Python path handles it
        md.eval()
        assert _C_cpu.exit_infer(md, x, None) is not None
        mh = copy.deepcopy(m).half()
        assert _C_cpu.exit_infer(mh, x.half(), None) is None  # fp16 parameters: the op path upcasts


def test_jit_trace_records_the_op():
    """A trace taken through the entry point would bake the first output in as a constant."""
    import warnings

    c = awkward_config("N25-h1")
    m, ref = pair(c)
    x, x2 = torch.randn(2, c.in_channels, *c.feature_size), torch.randn(2, c.in_channels, *c.feature_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, x, check_trace=False)
        torch.testing.assert_close(traced(x2), ref(x2), rtol=1e-5, atol=1e-5)


def test_grad_mode_declines_and_training_still_works():
    c = awkward_config("N25-h1")
    m, ref = pair(c)
    x = torch.randn(2, c.in_channels, *c.feature_size)
    assert torch.is_grad_enabled()
    assert _C_cpu.exit_infer(m, x, None) is None  # parameters require grad
    out = m(x)
    assert out.requires_grad
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)


def test_fused_switch_off_declines(monkeypatch):
    c = awkward_config("N25-h1")
    m, _ = pair(c)
    x = torch.randn(2, c.in_channels, *c.feature_size)
    monkeypatch.setenv("SLVIT_FAST_CPU_FUSED", "off")
    with torch.no_grad():
        assert _C_cpu.exit_infer(m, x, None) is None
    monkeypatch.setenv("SLVIT_FAST_CPU_FUSED", "maybe")
    with torch.no_grad():
        assert _C_cpu.exit_infer(m, x, None) is None
        with pytest.raises(Exception, match="SLVIT_FAST_CPU_FUSED"):
            m(x)


@pytest.mark.parametrize("name", ["N25-h1", "N49-h8-kd36", "N144-h12", "grid16x9-h24-extra", "N49-nores-relu",
                                  "nonsquare-patch"])
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_fewer_team_phases_equal_the_old_layout(name, batch, threads):
    """The team path with LayerNorm folded into the next GEMM and the flat/output copies folded into
    the GEMM that produced them computes exactly what the old phase layout computed."""
    c = awkward_config(name, num_layers=2) if name == "N49-nores-relu" else awkward_config(name)
    m, ref = pair(c)
    x = torch.randn(batch, c.in_channels, *c.feature_size)
    extra = torch.randn(batch, c.extra_tokens, c.extra_dim) if c.extra_tokens else None
    with torch.no_grad():
        new = check(m, ref, x, extra)
        _C_cpu._fused_debug(1, -1)
        try:
            old = m(x, extra)
        finally:
            _C_cpu._fused_debug(0, -1)
    torch.testing.assert_close(new, old, rtol=0, atol=0)


def test_profile_counters():
    c = SLViTConfig(**PRESETS["resnet152-b1"].slvit_kwargs())
    m = SLViTExit(c, backend="cpu").eval()
    x = torch.randn(1, c.in_channels, *c.feature_size)
    with torch.no_grad():
        _C_cpu._fused_debug(-1, 1)
        m(x)
        cycles = _C_cpu._fused_debug(-1, 0)
    assert cycles.shape == (12,) and (cycles >= 0).all()
    assert cycles[:8].sum() > 0  # gather .. fc2 were timed


# -- SLViTExit.forward calls the entry point first (cpu_backend.fast_forward) --------------------------


def fast_calls(m, x, extra=None):
    """Calls of the entry point made by m(x) (0 or 1), and m(x)."""
    f0 = _C_cpu.entry_stats()[0]
    with torch.no_grad():
        out = m(x, extra)
    return _C_cpu.entry_stats()[0] - f0, out


def test_forward_sees_a_changed_backend_choice_on_the_next_call(monkeypatch):
    """forward hands the call to the entry point only when backend resolution would pick backend "cpu";
    every input of that choice is read per call, so a change between two calls is always seen."""
    from slvit_fast import backends
    from slvit_fast.backends import torch_backend

    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    c = awkward_config("N25-h1")
    m, ref = pair(c)
    m.backend = "auto"
    x = torch.randn(1, c.in_channels, *c.feature_size)
    with torch.no_grad():
        expected = ref(x)

    def runs(fast):
        n, out = fast_calls(m, x)
        assert n == (1 if fast else 0)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    runs(True)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    runs(False)
    monkeypatch.setenv(backends.ENV_VAR, " cpu ")
    runs(True)
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="SLVIT_FAST_BACKEND='bogus'"):
        m(x)
    monkeypatch.delenv(backends.ENV_VAR)
    runs(True)
    m.backend = "torch"
    runs(False)
    m.backend = "cpu"
    runs(True)
    m.backend = "auto"
    with monkeypatch.context() as mp:
        mp.setitem(backends.AUTO_ORDER, "cpu", ("torch",))
        runs(False)
    runs(True)
    with monkeypatch.context() as mp:  # a test double in the registry (tests/test_backend_selection.py)
        mp.setitem(backends._loaded, "cpu", torch_backend.TorchBackend())
        runs(False)
    runs(True)
    for flag in ("_is_compiling_flag", "_is_exporting_flag"):  # compiled / exported graphs: never the extension
        with monkeypatch.context() as mp:
            mp.setattr(torch.compiler, flag, True)
            with torch.no_grad():
                assert cpu_backend.fast_forward(m, x, None) is None
    with torch.no_grad():
        assert cpu_backend.fast_forward(m, x, None) is not None
    runs(True)


def test_forward_input_errors_are_raised_before_and_after_the_entry_point():
    """The entry point checks x against the config (it runs before forward's own checks): a feature map
    with H and W swapped has the same token count on this non-square map, so only that check stops it."""
    from slvit_fast.errors import SLViTInputError

    c = awkward_config("N25-h1", feature_size=(8, 16), patch_size=4)
    m, ref = pair(c)
    x = torch.randn(1, c.in_channels, 8, 16)
    assert fast_calls(m, x)[0] == 1
    for bad in (x.transpose(2, 3).contiguous(), torch.randn(1, c.in_channels + 1, 8, 16), x[0]):
        with torch.no_grad(), pytest.raises(SLViTInputError):
            m(bad)
    with torch.no_grad(), pytest.raises(SLViTInputError, match="extra_tokens=0"):
        m(x, torch.randn(1, 2, 3))
    with torch.no_grad(), pytest.raises(SLViTInputError, match="empty batch"):
        m(x[:0])
    assert fast_calls(m, x)[0] == 1


def test_forward_under_inference_mode_takes_the_entry_point():
    """`slvit-fast bench` times inference under torch.inference_mode: the fast path must run there too, and
    its output is an inference tensor like the op path's."""
    c = awkward_config("N25-h1")
    m, ref = pair(c)
    x = torch.randn(1, c.in_channels, *c.feature_size)
    with torch.inference_mode():
        n, out = fast_calls(m, x)
        expected = ref(x)
    assert n == 1 and out.is_inference() and expected.is_inference()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_exits_built_under_inference_mode_take_the_entry_point_and_see_every_change():
    """Parameters made under torch.inference_mode are inference tensors, with no version counter. The entry
    keeps only pointers (float32 contiguous parameters, compared with the live tensors on every call) and
    keys such tensors' version as -1, so they take the fast path and every change is seen: in place (no
    version to bump), load_state_dict, .data =, a replaced Parameter. Also the review-9 case: a Parameter
    made under inference_mode whose .data was replaced by an ordinary tensor has no counter either, and
    reading its _version threw out of the entry and aborted the process. In a child process, so a
    regression fails this test instead of killing the suite."""
    import os
    import subprocess
    import sys

    code = """
import torch
from kernel_cases import awkward_config, randomize_
from slvit_fast import SLViTExit, _C_cpu

c = awkward_config('N49-h8-kd36')
fast = lambda: _C_cpu.entry_stats()[0]

def check(m, x, tag):
    ref = SLViTExit(c, backend='torch').eval()
    ref.load_state_dict(m.state_dict())
    f0 = fast()
    out = m(x)
    assert fast() == f0 + 1, f'{tag}: the call did not take the entry point'
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5, msg=lambda s: f'{tag}: {s}')
    return out

x = torch.randn(1, c.in_channels, *c.feature_size)
with torch.inference_mode():
    m = randomize_(SLViTExit(c, backend='cpu'), 0).eval()
    assert all(p.is_inference() for p in m.parameters())
    first = check(m, x, 'first call')
    check(m, x, 'second call')
    m.layers[0].attn.q.weight.mul_(1.5)
    changed = check(m, x, 'in place')
    assert not torch.allclose(changed, first)
    m.load_state_dict(randomize_(SLViTExit(c, backend='cpu'), 5).state_dict())
    check(m, x, 'load_state_dict')
    m.patch_embed.weight.data = torch.randn_like(m.patch_embed.weight) * 0.1
    check(m, x, '.data =')
    m.layers[0].mlp.fc1.weight = torch.nn.Parameter(torch.randn_like(m.layers[0].mlp.fc1.weight) * 0.2)
    check(m, x, 'replaced Parameter')
    check(m, torch.randn(3, c.in_channels, *c.feature_size), 'batch 3')

for p in m.parameters():
    p.data = p.detach().clone()  # ordinary tensors now, in Parameters that have no counter
    assert not p.is_inference()
with torch.no_grad():
    check(m, x, 'review-9 case')
    m.layers[0].mlp.fc2.weight.data.mul_(-1.0)  # bumps no version: seen all the same
    check(m, x, '.data in place')
print('ok')
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-3000:])