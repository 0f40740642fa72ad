"""presets.build(weights=...): state_dicts, files, torchvision weights names; classifier replacement (#13 item 2)."""

from __future__ import annotations

import logging
import urllib.error

import pytest
import torch
import torchvision

from slvit_fast import presets
from slvit_fast.backbones.weights import WeightsUnavailableError

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def _imagenet_like_resnet18(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=1000).state_dict()  # 1000-way classifier


def _assert_backbone_equal(state: dict, net, skip=("fc.weight", "fc.bias")) -> None:
    mine = net.backbone.state_dict()
    assert set(mine) == set(state)
    for k, v in state.items():
        if k not in skip:
            assert torch.equal(mine[k], v), k


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_file_round_trip_replaces_a_differently_sized_classifier(tmp_path, suffix, caplog):
    state = _imagenet_like_resnet18()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="slvit_fast"):
        net = presets.build("resnet18", weights=str(path), num_outputs=10, input_size=32, exit_backend="torch")
    _assert_backbone_equal(state, net)
    assert net.backbone.fc.weight.shape == (10, 512) and net.backbone.fc.bias.shape == (10,)
    assert net.classifier_replaced
    assert any("'fc' has 1000 outputs" in r.getMessage() and "10-output" in r.getMessage() for r in caplog.records)
    assert net(torch.randn(2, 3, 32, 32))[-1].shape == (2, 10)


def test_same_size_classifier_is_kept_and_mappings_and_ddp_prefixes_load():
    state = _imagenet_like_resnet18(1)
    net = presets.build("resnet18", weights={f"module.{k}": v for k, v in state.items()}, num_outputs=1000,
                        input_size=32, exit_backend="torch")
    _assert_backbone_equal(state, net, skip=())
    assert not net.classifier_replaced and net.weights_notes == []
    wrapped = presets.build("resnet18", weights={"state_dict": state}, num_outputs=1000, input_size=32)
    _assert_backbone_equal(state, wrapped, skip=())


def test_weights_that_do_not_fit_list_every_problem(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet34(num_classes=10).state_dict()
    with pytest.raises(ValueError, match=r"do not fit backbone 'resnet18'.*unexpected .*layer1\.2"):
        presets.build("resnet18", weights=state, input_size=32)
    bad = dict(_imagenet_like_resnet18())
    bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ValueError, match=r"shape mismatch.*conv1\.weight"):
        presets.build("resnet18", weights=bad, input_size=32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        presets.build("resnet18", weights=str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        presets.build("resnet18", weights=str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        presets.build("resnet18", weights="IMAGENET9K")


def test_torchvision_weights_name_offline_error_names_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        presets.build("resnet18", weights="IMAGENET1K_V1", num_outputs=10)
    msg = str(err.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "weights='/path/to/resnet18-f37072fd.pth'" in msg and "URLError" in msg


def test_torchvision_weights_name_uses_a_file_in_torchvisions_cache(tmp_path, monkeypatch):
    """The offline error's advice works: the file put where it says loads without any download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = _imagenet_like_resnet18(2)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / "resnet18-f37072fd.pth")
    net = presets.build("resnet18", weights="ResNet18_Weights.IMAGENET1K_V1", num_outputs=10, input_size=32)
    _assert_backbone_equal(state, net)
    assert net.classifier_replaced


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta")
def test_whole_network_state_and_inception_aux_weights(tmp_path):
    torch.manual_seed(0)
    net = presets.build("resnet18", num_outputs=10, input_size=32, exit_backend="torch")
    again = presets.build("resnet18", num_outputs=10, input_size=32, weights=net.state_dict(), exit_backend="torch")
    for (k, v), (_, w) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k
    with torch.device("meta"):
        tv = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    state = {k: torch.zeros(v.shape) for k, v in tv.state_dict().items()}
    with torch.device("meta"):
        inc = presets.build("inception_v3", weights=state, num_outputs=10)
    assert any("AuxLogits" in n for n in inc.weights_notes) and inc.classifier_replaced
