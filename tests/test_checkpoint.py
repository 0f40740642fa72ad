"""Exit checkpoints (issue #12 items 4 and 9): loading is all or nothing, and every unreadable or
non-fitting file is an error that names the file and what is wrong with it."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from slvit_fast import CNNExit, CNNExitConfig, MultiExitNetwork, SLViTConfig, SLViTExit
from slvit_fast.checkpoint import load_exits, read_exit_metadata, save_exits
from slvit_fast.errors import CheckpointMismatchError


def three_exit_net(seed: int, cnn_filters: int = 4) -> MultiExitNetwork:
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    slvit = lambda size: SLViTExit(SLViTConfig(in_channels=8, feature_size=size, patch_size=2, embed_dim=8,  # noqa: E731
                                                num_heads=2, mlp_dim=16, head_hidden=16, num_outputs=4),
                                   backend="torch")
    cnn = CNNExit(CNNExitConfig(in_channels=8, feature_size=8, filters=cnn_filters, head_hidden=16, num_outputs=4))
    return MultiExitNetwork(backbone, {"1": slvit(8), "3": cnn, "5": slvit(4)})


def snapshot(net: MultiExitNetwork) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_unchanged(net: MultiExitNetwork, before: dict[str, torch.Tensor]) -> None:
    after = net.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a failed load"


def rewrite(src, dst, edit_tensors=None, edit_meta=None):
    """Copy an exits checkpoint, changing its tensors and/or metadata on the way."""
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "exits.safetensors"
    save_exits(three_exit_net(seed=0), path)
    return path


def test_round_trip(saved):
    net = three_exit_net(seed=1)
    load_exits(net, saved)
    ref = three_exit_net(seed=0)
    for k, v in ref.exits.state_dict().items():
        assert torch.equal(net.exits.state_dict()[k], v)


def _wrong_shape(t):  # exit 2 (the third one, "5") gets a wrong-shaped position embedding
    t["5/pos_embed"] = torch.zeros(3, 8)


def _unexpected(t):  # one unexpected tensor in the last exit
    t["5/bogus"] = torch.zeros(2)


def _orphan(t):  # a tensor that belongs to no exit
    t["nowhere/weight"] = torch.zeros(2)


def _missing(t):
    del t["5/head.fc2.bias" if "5/head.fc2.bias" in t else sorted(k for k in t if k.startswith("5/"))[-1]]


@pytest.mark.parametrize("edit, message", [
    (_wrong_shape, r"exit '5': 'pos_embed' has shape \(3, 8\) in the checkpoint, \(4, 8\) in the model"),
    (_unexpected, r"exit '5': unexpected tensor 'bogus'"),
    (_orphan, r"'nowhere/weight' belongs to no exit"),
    (_missing, r"exit '5': checkpoint lacks"),
], ids=["shape-in-exit-2", "unexpected-key", "orphan-tensor", "missing-tensor"])
def test_failed_load_leaves_every_tensor_unchanged(saved, tmp_path, edit, message):
    bad = rewrite(saved, tmp_path / "bad.safetensors", edit_tensors=edit)
    net = three_exit_net(seed=7)
    before = snapshot(net)
    with pytest.raises(Exception) as info:
        load_exits(net, bad)
    assert_unchanged(net, before)  # first: the all-or-nothing promise, whatever the message
    assert info.type is CheckpointMismatchError and re.search(message, str(info.value))
    assert str(bad) in str(info.value) and "nothing was loaded" in str(info.value)


def test_config_mismatch_in_a_later_exit_leaves_earlier_exits_unchanged(saved):
    net = three_exit_net(seed=7, cnn_filters=5)  # exit 1 ("3") differs; exit 0 would load
    before = snapshot(net)
    with pytest.raises(CheckpointMismatchError) as info:
        load_exits(net, saved)
    assert_unchanged(net, before)
    assert "exit '3': config mismatch: filters: checkpoint 4 vs model 5" in str(info.value)


def test_every_problem_is_listed_at_once(saved, tmp_path):
    bad = rewrite(saved, tmp_path / "bad.safetensors", edit_tensors=lambda t: (_wrong_shape(t), _unexpected(t)))
    with pytest.raises(CheckpointMismatchError) as info:
        load_exits(three_exit_net(seed=7), bad)
    assert "pos_embed" in str(info.value) and "bogus" in str(info.value)


def test_metadata_without_exits_names_the_file(saved, tmp_path):
    bad = rewrite(saved, tmp_path / "noexits.safetensors", edit_meta=lambda m: m.pop("exits"))
    with pytest.raises(CheckpointMismatchError, match=r"noexits.safetensors: the metadata has no 'exits' entry"):
        load_exits(three_exit_net(seed=7), bad)


def test_metadata_not_json_names_the_file(saved, tmp_path):
    bad = rewrite(saved, tmp_path / "notjson.safetensors", edit_meta=lambda m: m.__setitem__("exits", "[{oops"))
    with pytest.raises(CheckpointMismatchError, match=r"notjson.safetensors: the metadata 'exits' entry is not valid JSON"):
        read_exit_metadata(bad)


def test_metadata_entry_lacking_fields(saved, tmp_path):
    bad = rewrite(saved, tmp_path / "partial.safetensors",
                  edit_meta=lambda m: m.__setitem__("exits", json.dumps([{"key": "1"}])))
    with pytest.raises(CheckpointMismatchError, match=r"partial.safetensors: metadata entry 0 of 'exits' lacks"):
        load_exits(three_exit_net(seed=7), bad)


def test_directory_is_a_clear_error(saved):
    with pytest.raises(IsADirectoryError, match=r"not a directory \(it holds exits.safetensors\)") as info:
        load_exits(three_exit_net(seed=7), saved.parent)
    assert str(saved.parent) in str(info.value)


def test_not_a_safetensors_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointMismatchError, match=r"junk.safetensors: not a readable safetensors file"):
        load_exits(three_exit_net(seed=7), junk)


def test_non_finite_weights_load_with_a_warning_naming_them(saved, tmp_path):
    def poison(t):
        t["1/pos_embed"][0, 0] = float("nan")
        t["3/conv.weight"][0, 0, 0, 0] = float("inf")

    bad = rewrite(saved, tmp_path / "nan.safetensors", edit_tensors=poison)
    net = three_exit_net(seed=7)
    with pytest.warns(RuntimeWarning, match=r"nan.safetensors: non-finite values .* 1/pos_embed, 3/conv.weight"):
        load_exits(net, bad)
    assert torch.isnan(net.exits["1"].pos_embed[0, 0])


def test_finite_weights_load_without_warning(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_exits(three_exit_net(seed=7), saved)


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    """Files written through atomic_write (exits, checkpoints, run files) were private (0600, mkstemp's mode):
    a colleague or another container user could not read a run. They now get 0666 & ~umask like open()."""
    import os
    import stat

    from slvit_fast.checkpoint import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda tmp: open(tmp, "w").write("{}"))
        with open(tmp_path / "b.json", "w") as f:
            f.write("{}")
        os.umask(0o077)
        atomic_write(tmp_path / "c.json", lambda tmp: open(tmp, "w").write("{}"))
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE((tmp_path / name).stat().st_mode)
    assert mode("a.json") == mode("b.json") == 0o644
    assert mode("c.json") == 0o600


def test_atomic_write_keeps_the_mode_of_a_file_it_replaces(tmp_path):
    import os
    import stat

    from slvit_fast.checkpoint import atomic_write

    path = tmp_path / "private.json"
    path.write_text("{}")
    os.chmod(path, 0o600)
    old = os.umask(0o022)
    try:
        atomic_write(path, lambda tmp: open(tmp, "w").write("[]"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "[]"
