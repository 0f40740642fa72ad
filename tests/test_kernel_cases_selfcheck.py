"""The shared backend check must be able to fail: a wrong 'backend' is caught, the reference passes."""

import pytest
import torch

from kernel_cases import AWKWARD_CONFIGS, awkward_config, check_against_reference, check_nan_isolated, requires_half
from slvit_fast import backends
from slvit_fast.backends import torch_backend


@pytest.mark.parametrize("name", list(AWKWARD_CONFIGS))
def test_reference_passes_its_own_check_fp32(name):
    check_against_reference("torch", awkward_config(name), batch=3)


@requires_half
def test_reference_passes_its_own_check_fp16():
    check_against_reference("torch", awkward_config("N49-h8-kd36"), batch=2, dtype=torch.float16)


class _OffByOneSoftmax(torch_backend.TorchBackend):
    """A plausible kernel bug: the attention output projection off by 1%."""

    name = "buggy"

    def slvit_exit(self, module, x, extra):
        from slvit_fast import reference

        original = reference.attention_block

        def scaled(t, *args, **kwargs):
            args = list(args)
            args[8] = args[8] * 1.01  # wo: the output-projection weight
            return original(t, *args, **kwargs)

        reference.attention_block = scaled
        try:
            return super().slvit_exit(module, x, extra)
        finally:
            reference.attention_block = original


def test_check_catches_a_small_bug(monkeypatch):
    monkeypatch.setitem(backends.KNOWN_BACKENDS, "buggy", "not-imported")
    monkeypatch.setitem(backends._loaded, "buggy", _OffByOneSoftmax())
    with pytest.raises(AssertionError, match="exceeds"):
        check_against_reference("buggy", awkward_config("N25-h1"), batch=2)


class _BatchMixing(torch_backend.TorchBackend):
    """A plausible kernel bug: a batch-shared buffer lets one sample's values reach another's logits."""

    name = "mixing"

    def slvit_exit(self, module, x, extra):
        out = super().slvit_exit(module, x, extra)
        return out + 1e-3 * out.mean(0, keepdim=True)


def test_nan_scenario_passes_reference_and_catches_mixing(monkeypatch):
    check_nan_isolated("torch")
    monkeypatch.setitem(backends.KNOWN_BACKENDS, "mixing", "not-imported")
    monkeypatch.setitem(backends._loaded, "mixing", _BatchMixing())
    with pytest.raises(AssertionError, match="leaked"):
        check_nan_isolated("mixing")
