"""Resuming from ``checkpoint_dir`` (review 10: F6, F10, F7).

* F6: the checkpoint records the exits' types/configs and the backbone's hash; resuming onto anything else
  fails naming the field and both values, before anything is loaded. Older checkpoints are refused with a
  message, and ``upgrade_checkpoint`` lets one be resumed deliberately.
* F10: an empty or truncated ``training_state.pt`` is one error naming the file.
* F7: a loader with its own ``torch.Generator`` (or CopycatSampler's epoch counter) resumes bit-identically.
"""

from __future__ import annotations

import logging
import re
import shutil

import pytest
import torch
from torch.utils.data import DataLoader, Sampler

from training_fixtures import NUM_CLASSES, loader, quadrant_task, tiny_backbone
from slvit_fast import CNNExit, CNNExitConfig, SLViTConfig, SLViTExit
from slvit_fast.errors import CheckpointMismatchError
from slvit_fast.multi_exit import MultiExitNetwork
from slvit_fast.training import train_exits
from slvit_fast.training.copycat import copycat_loader
from slvit_fast.training.checkpointing import CheckpointDir

TRAIN, VAL = quadrant_task(32), quadrant_task(16, seed=1)


def net_with(seed: int = 0, backbone_seed: int | None = None, activation: str = "gelu", first: str = "slvit",
             size: int = 8) -> MultiExitNetwork:
    """tiny_net's network, with one thing changed: exit 0's activation or type, the input size, the backbone."""
    backbone = tiny_backbone(seed if backbone_seed is None else backbone_seed)
    torch.manual_seed(seed + 1)
    if first == "slvit":
        e0 = SLViTExit(SLViTConfig(in_channels=8, feature_size=size, patch_size=2, embed_dim=16, num_heads=2,
                                   mlp_dim=32, head_hidden=32, num_outputs=NUM_CLASSES, activation=activation))
    else:
        e0 = CNNExit(CNNExitConfig(in_channels=8, feature_size=size, filters=4, head_hidden=16,
                                   num_outputs=NUM_CLASSES))
    e1 = CNNExit(CNNExitConfig(in_channels=8, feature_size=size // 2, filters=4, head_hidden=16,
                               num_outputs=NUM_CLASSES))
    return MultiExitNetwork(backbone, {"2": e0, "5": e1})


def train(net, ckpt, epochs=2, train_loader=None, **kw):
    return train_exits(net, train_loader or loader(TRAIN, batch_size=8), loader(VAL), epochs=epochs, lr=2e-3,
                       checkpoint_dir=ckpt, progress=False, **kw)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A checkpoint folder after epoch 0 of 2 (copied per test, so every test starts from the same files)."""
    d = tmp_path_factory.mktemp("ckpt") / "run"
    train(net_with(), d, stop_after_epoch=0)
    return d


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("other, expect", [
    (dict(activation="relu"), re.escape("activation: checkpoint 'gelu' vs model 'relu'")),
    (dict(first="cnn"), re.escape("checkpoint holds a SLViTExit, the network a CNNExit")),
    (dict(size=16), re.escape("feature_size: checkpoint [8, 8] vs model [16, 16]")),
    (dict(backbone_seed=5), "backbone: checkpoint [0-9a-f]{32} vs model [0-9a-f]{32}"),
], ids=["activation", "exit-type", "input-size", "backbone-weights"])
def test_resume_onto_other_exits_or_backbone_names_the_field_and_loads_nothing(written, tmp_path, other, expect):
    d = tmp_path / "run"
    shutil.copytree(written, d)
    net = net_with(**other)
    before = snapshot(net)
    with pytest.raises(CheckpointMismatchError, match=re.escape(str(d / "training_state.pt"))) as info:
        train(net, d)
    assert re.search(expect, str(info.value)), str(info.value)
    after = snapshot(net)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    # and the folder still resumes into the right network
    h = train(net_with(), d)
    assert [e["epoch"] for e in h.epochs] == [0, 1]


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_unreadable_training_state_is_one_error_naming_the_file(written, tmp_path, damage):
    d = tmp_path / "run"
    shutil.copytree(written, d)
    path = d / "training_state.pt"
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match=re.escape(str(path)) + ": cannot read the training state") as info:
        train(net_with(), d)
    assert "resume=False" in str(info.value) and f"delete {d}" in str(info.value)


def test_a_flipped_byte_in_the_training_state_is_refused_naming_the_file(written, tmp_path):
    """torch.load does not check its zip records' CRCs: a flipped byte inside a stored tensor loaded silently
    (review 10) and a resume would have continued from corrupted exits or optimizer moments. The state is
    sealed with a CRC-32 (checkpointing._seal) and checked before anything is used."""
    d = tmp_path / "run"
    shutil.copytree(written, d)
    path = d / "training_state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the sealed payload (by far the largest record)
    path.write_bytes(bytes(data))
    net = net_with()
    before = snapshot(net)
    with pytest.raises(CheckpointMismatchError, match=re.escape(str(path)) + ": checksum mismatch") as info:
        train(net, d)
    assert "resume=False" in str(info.value)
    after = snapshot(net)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _interrupt_after(k):
    def stop(epoch, history):
        if epoch == k:
            raise KeyboardInterrupt(f"test interruption after epoch {k}")  # after the epoch's commit
    return [{"on_epoch_end": stop}]


def _gen_loader():
    return DataLoader(TRAIN, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(11))


def _copycat_loader():
    return copycat_loader(TRAIN, quadrant_task(8, seed=2), ratio=0.5, batch_size=8, seed=4)


@pytest.mark.parametrize("make_loader, cuts", [(_gen_loader, (0, 1)), (_copycat_loader, (1,))],
                         ids=["DataLoader-generator", "CopycatSampler"])
def test_interrupted_run_with_a_loader_generator_resumes_bit_identical(tmp_path, make_loader, cuts):
    epochs = 3
    ref = net_with()
    ref_hist = train(ref, tmp_path / "ref", epochs=epochs, train_loader=make_loader(), early_stopping_patience=None)
    for k in cuts:
        d = tmp_path / f"cut{k}"
        with pytest.raises(KeyboardInterrupt):
            train(net_with(), d, epochs=epochs, train_loader=make_loader(), early_stopping_patience=None,
                  callbacks=_interrupt_after(k))
        torch.manual_seed(999)  # whatever happened in between must not matter
        resumed = net_with(seed=3, backbone_seed=0)  # other initial exit weights: all must come from the checkpoint
        hist = train(resumed, d, epochs=epochs, train_loader=make_loader(), early_stopping_patience=None)
        for key, v in ref.exits.state_dict().items():
            assert torch.equal(resumed.exits.state_dict()[key], v), f"interrupted after epoch {k}: {key} differs"
        assert [[r["train_loss"] for r in e["exits"]] for e in hist.epochs] == \
               [[r["train_loss"] for r in e["exits"]] for e in ref_hist.epochs]


class _OwnRngSampler(Sampler[int]):
    def __init__(self, n):
        self.n, self.g = n, torch.Generator().manual_seed(0)

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.g).tolist())


def test_a_sampler_with_hidden_random_state_gets_a_warning_at_resume(written, tmp_path, caplog):
    d = tmp_path / "run"
    shutil.copytree(written, d)
    with caplog.at_level(logging.WARNING, logger="slvit_fast.training"):
        train(net_with(), d, train_loader=DataLoader(TRAIN, batch_size=8, sampler=_OwnRngSampler(len(TRAIN))))
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train loader's order comes from a _OwnRngSampler" in m and "not guaranteed to be bit-identical" in m
               for m in msgs), msgs


def _make_old(d, fmt):
    """Rewrite a checkpoint as an older version wrote it: format /2 (no exit records, no backbone hash, no
    loader RNG) or the first format (no format field, exits only in last.safetensors, no RNG)."""
    p = d / "training_state.pt"
    state = CheckpointDir(d).read()  # the payload inside the checksum envelope (older versions had none)
    state = {k: v for k, v in state.items() if k not in ("exit_records", "backbone_hash")}
    if fmt == "first":
        state = {k: v for k, v in state.items() if k not in ("format", "exits", "rng")}
    else:
        state["format"] = "slvit_fast.training_state/2"
        state["rng"] = {k: v for k, v in state["rng"].items() if k != "loaders"}
    torch.save(state, p)


@pytest.mark.parametrize("fmt", ["/2", "first"])
def test_an_older_checkpoint_is_refused_until_upgraded_then_resumes_exactly(written, tmp_path, fmt):
    from slvit_fast.training.checkpointing import upgrade_checkpoint

    straight = net_with()
    train(straight, tmp_path / "straight")
    d = tmp_path / "run"
    shutil.copytree(written, d)
    _make_old(d, fmt)
    with pytest.raises(CheckpointMismatchError, match="written by an older slvit_fast .*upgrade_checkpoint"):
        train(net_with(), d)
    with pytest.raises(CheckpointMismatchError, match=re.escape("activation: checkpoint 'gelu' vs model 'relu'")):
        upgrade_checkpoint(d, net_with(activation="relu"))  # configs still checked, from last.safetensors
    upgrade_checkpoint(d, net_with())
    resumed = net_with(seed=3, backbone_seed=0)
    train(resumed, d)
    for k, v in straight.exits.state_dict().items():
        assert torch.equal(resumed.exits.state_dict()[k], v), k
