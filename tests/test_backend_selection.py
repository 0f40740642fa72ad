"""Backend choice: explicit, environment, automatic fallback with a reason; errors say why."""

import warnings

import pytest
import torch

import slvit_fast as sf
from slvit_fast import backends
from slvit_fast.backends import torch_backend


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
