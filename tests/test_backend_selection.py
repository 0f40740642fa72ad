"""Backend choice: explicit, environment, automatic fallback with a reason; errors say why."""

import warnings

import pytest
import torch

import slvit_fast as sf
from slvit_fast import backends
from slvit_fast.backends import env, torch_backend


class _Unavailable(torch_backend.TorchBackend):
    name = "cpu"

    def unavailable_reason(self, x):
        return "extension not compiled (test double)"


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends._reset_for_tests()
    yield monkeypatch
    backends._reset_for_tests()


def _exit(backend="auto"):
    return sf.SLViTExit(sf.SLViTConfig(in_channels=2, feature_size=4, patch_size=2, embed_dim=8, num_heads=1,
                                       mlp_dim=8, head_hidden=4, num_outputs=2), backend=backend)


def test_unknown_backend_name_lists_valid():
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; valid: \['auto', 'torch'"):
        _exit("tpu")


def test_explicit_unavailable_backend_raises_with_reason(fresh_registry):
    fresh_registry.setitem(backends._loaded, "cpu", _Unavailable())
    with pytest.raises(sf.BackendUnavailableError, match="extension not compiled"):
        _exit("cpu")(torch.randn(1, 2, 4, 4))


def test_auto_falls_back_and_warns_once(fresh_registry):
    fresh_registry.setitem(backends._loaded, "cpu", _Unavailable())
    module = _exit()
    with pytest.warns(RuntimeWarning, match=r"uses 'torch'; skipped 'cpu' \(extension not compiled"):
        module(torch.randn(1, 2, 4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(torch.randn(1, 2, 4, 4))  # the same reason is not repeated
    assert module.active_backend(torch.randn(1, 2, 4, 4)) == "torch"


def test_env_var_selects_backend(fresh_registry):
    fresh_registry.setenv(backends.ENV_VAR, "torch")
    assert _exit().active_backend(torch.randn(1, 2, 4, 4)) == "torch"
    fresh_registry.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="SLVIT_FAST_BACKEND='bogus'"):
        _exit()(torch.randn(1, 2, 4, 4))


def test_explicit_backend_beats_env_var(fresh_registry):
    fresh_registry.setitem(backends._loaded, "cpu", _Unavailable())
    fresh_registry.setenv(backends.ENV_VAR, "cpu")
    assert _exit("torch").active_backend(torch.randn(1, 2, 4, 4)) == "torch"


def test_not_implemented_backend_is_a_clear_error(fresh_registry):
    fresh_registry.setitem(backends.KNOWN_BACKENDS, "cpu", "slvit_fast.backends.no_such_module")
    with pytest.raises(sf.BackendNotImplementedError, match="backend 'cpu' is not implemented"):
        _exit("cpu")(torch.randn(1, 2, 4, 4))


def test_status_reports_every_backend():
    status = backends.status()
    assert set(status) == set(backends.KNOWN_BACKENDS) and status["torch"] == "available"


# -- environment switches (issue #12 item 9): one parser, every spelling, clear errors ------------------

@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("YES", True), (" on ", True),
                                            ("0", False), ("false", False), ("No", False), ("OFF", False),
                                            ("", True)])
def test_env_flag_spellings(monkeypatch, value, expected):
    monkeypatch.setenv("SLVIT_FAST_TEST_SWITCH", value)
    assert env.flag("SLVIT_FAST_TEST_SWITCH", default=True) is expected


def test_env_flag_unset_is_the_default(monkeypatch):
    monkeypatch.delenv("SLVIT_FAST_TEST_SWITCH", raising=False)
    assert env.flag("SLVIT_FAST_TEST_SWITCH", default=False) is False


def test_env_flag_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("SLVIT_FAST_TEST_SWITCH", "maybe")
    with pytest.raises(ValueError, match=r"SLVIT_FAST_TEST_SWITCH='maybe' is not an on/off value"):
        env.flag("SLVIT_FAST_TEST_SWITCH", default=True)


def test_env_backend_with_spaces_and_unknown(fresh_registry):
    fresh_registry.setenv(backends.ENV_VAR, " torch ")
    assert _exit().active_backend(torch.randn(1, 2, 4, 4)) == "torch"
    fresh_registry.setenv(backends.ENV_VAR, "Torch")
    with pytest.raises(ValueError, match=r"SLVIT_FAST_BACKEND='Torch' is not a valid value; valid: \['auto'"):
        _exit()(torch.randn(1, 2, 4, 4))


CPU_REASON = backends.status(torch.empty(1, 1, 1, 1)).get("cpu")
HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _fused_path_used(module, x) -> bool:
    with torch.no_grad(), torch.autograd.profiler.profile() as prof:
        module(x)
    return any(e.name == "slvit_cpu::fused_forward" for e in prof.function_events)


@pytest.mark.skipif(CPU_REASON != "available" or not HAS_AVX2, reason=f"cpu backend {CPU_REASON}, avx2 {HAS_AVX2}")
@pytest.mark.parametrize("value,fused", [("false", False), ("no", False), ("off", False), ("OFF", False),
                                         ("0", False), ("true", True), ("yes", True), ("on", True), ("1", True)])
def test_cpu_fused_switch_spellings(monkeypatch, value, fused):
    """SLVIT_FAST_CPU_FUSED=false/no/off acts like 0 (the ATen path), true/yes/on like 1 (the fused path)."""
    module = _exit("cpu").eval()
    x = torch.randn(2, 2, 4, 4)
    monkeypatch.delenv(env.CPU_FUSED, raising=False)
    assert _fused_path_used(module, x)  # the default
    monkeypatch.setenv(env.CPU_FUSED, value)
    assert _fused_path_used(module, x) is fused


@pytest.mark.skipif(CPU_REASON != "available", reason=f"cpu backend: {CPU_REASON}")
def test_cpu_fused_switch_unknown_value_is_an_error(monkeypatch):
    """Wherever the switch is read (inference; training never reads it) a typo is an error, not 'on'."""
    monkeypatch.setenv(env.CPU_FUSED, "fast")
    module = _exit("cpu").eval()
    match = r"SLVIT_FAST_CPU_FUSED='fast' is not an on/off value"
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError), match=match):
        module(torch.randn(1, 2, 4, 4))  # the inference fast entry reads the switch
    with torch.no_grad(), torch.autograd.profiler.profile(), pytest.raises((ValueError, RuntimeError), match=match):
        module(torch.randn(3, 2, 4, 4))  # under a profiler the fast entry declines: the op path reads it
