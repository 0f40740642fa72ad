"""Exit training: frozen backbone, learning, feature cache, copycat mixing, checkpoints and resume."""

import copy
import os

import pytest
import torch

from training_fixtures import loader, quadrant_task, tiny_net
from slvit_fast import CheckpointMismatchError
from slvit_fast.training import (
    CopycatMix, CopycatSampler, Distillation, copycat_finetune, label_with_network, load_exits, save_exits, train_exits,
)
from slvit_fast.checkpoint import atomic_write
from slvit_fast.training.checkpointing import CheckpointDir

QUIET = dict(progress=False)


def _exit_state(net):
    return {k: v.clone() for k, v in net.exits.state_dict().items()}


def test_backbone_bit_identical_and_exits_learn():
    net = tiny_net()
    before = copy.deepcopy(net.backbone.state_dict())
    hist = train_exits(net, loader(quadrant_task(96), shuffle=True), loader(quadrant_task(48, seed=1)),
                       epochs=6, lr=3e-3, **QUIET)
    after = net.backbone.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # weights and BatchNorm running statistics, bit for bit
        assert torch.equal(before[k], after[k]), k
    for i in range(net.num_exits):
        losses = hist.exit_series(i, "train_loss")
        assert all(b < a for a, b in zip(losses, losses[1:])), f"exit {i}: loss did not decrease every epoch: {losses}"
    assert hist.exit_series(0, "train_loss")[-1] < 0.7 * hist.exit_series(0, "train_loss")[0]
    assert hist.exit_series(0, "val_metric")[-1] > 0.5  # well above chance (0.25)


def test_paper_defaults_reduce_lr_on_plateau_and_stop_early():
    net = tiny_net()
    # Validation labels are noise: the validation loss cannot improve for long, so the schedule kicks in.
    noise = quadrant_task(32, seed=3)
    noise.tensors = (noise.tensors[0], torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(9)))
    hist = train_exits(net, loader(quadrant_task(32)), loader(noise), epochs=40, lr=1e-2, **QUIET)
    lrs = hist.exit_series(0, "lr")
    assert min(lrs) < 1e-2 and any(abs(lr - 6e-3) < 1e-9 for lr in lrs)  # x0.6 after 2 bad epochs
    assert len(hist.epochs) < 40 and all(e["stopped"] for e in hist.epochs[-1]["exits"])


def test_feature_cache_training_equals_live_training(tmp_path):
    train, val = loader(quadrant_task(48)), loader(quadrant_task(16, seed=1))
    live, cached = tiny_net(), tiny_net()
    h_live = train_exits(live, train, val, epochs=3, lr=2e-3, **QUIET)
    h_cache = train_exits(cached, train, val, epochs=3, lr=2e-3, cache_dir=tmp_path / "cache", shuffle_cache=False,
                          **QUIET)
    assert len(list((tmp_path / "cache" / "train").glob("*/feat0.npy"))) == 1  # one folder per fingerprint
    for k, v in _exit_state(live).items():
        torch.testing.assert_close(_exit_state(cached)[k], v, rtol=1e-5, atol=1e-6)
    assert h_cache.exit_series(1, "val_loss") == pytest.approx(h_live.exit_series(1, "val_loss"), rel=1e-5)


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    net = tiny_net(seed=0)
    save_exits(net, tmp_path / "exits.safetensors")
    other = tiny_net(seed=5)
    assert not torch.equal(other.exits.state_dict()["2.pos_embed"], net.exits.state_dict()["2.pos_embed"])
    load_exits(other, tmp_path / "exits.safetensors")
    for k, v in net.exits.state_dict().items():
        assert torch.equal(other.exits.state_dict()[k], v)
    from slvit_fast import SLViTConfig, SLViTExit
    from slvit_fast.multi_exit import MultiExitNetwork
    from training_fixtures import tiny_backbone

    wrong = MultiExitNetwork(tiny_backbone(), {"2": SLViTExit(SLViTConfig(in_channels=8, feature_size=8, patch_size=2,
                             embed_dim=16, num_heads=4, mlp_dim=32, head_hidden=32, num_outputs=4)),
                             "5": copy.deepcopy(net.exits["5"])})
    with pytest.raises(CheckpointMismatchError, match=r"num_heads: checkpoint 2 vs model 4"):
        load_exits(wrong, tmp_path / "exits.safetensors")


def test_atomic_write_keeps_the_previous_file_on_a_crash(tmp_path):
    target = tmp_path / "exits.safetensors"
    save_exits(tiny_net(), target)
    good = target.read_bytes()

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == good and len(os.listdir(tmp_path)) == 1


def test_resume_continues_from_last_completed_epoch(tmp_path):
    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    straight = tiny_net()
    train_exits(straight, train, val, epochs=3, lr=2e-3, **QUIET)
    interrupted = tiny_net()
    train_exits(interrupted, train, val, epochs=3, lr=2e-3, checkpoint_dir=tmp_path, stop_after_epoch=0, **QUIET)
    assert CheckpointDir(tmp_path).read()["epoch"] == 0
    resumed = tiny_net(seed=7)  # different initial exits: everything must come from the checkpoint
    resumed.backbone.load_state_dict(straight.backbone.state_dict())
    hist = train_exits(resumed, train, val, epochs=3, lr=2e-3, checkpoint_dir=tmp_path, **QUIET)
    assert [e["epoch"] for e in hist.epochs] == [0, 1, 2]
    for k, v in _exit_state(straight).items():
        torch.testing.assert_close(_exit_state(resumed)[k], v, rtol=1e-5, atol=1e-6)


def test_copycat_ratio_is_exact_each_epoch():
    real, fake = quadrant_task(30), quadrant_task(25, seed=2)
    mix = CopycatMix(real, fake, ratio=2.0)
    sampler = CopycatSampler(mix, seed=0)
    draws = []
    for _ in range(3):
        idx = list(sampler)
        n_fake = sum(mix.is_fake(i) for i in idx)
        assert n_fake == 60 and len(idx) - n_fake == 30
        assert sorted(i for i in idx if not mix.is_fake(i)) == list(range(30))  # every real sample once
        draws.append(sorted(i for i in idx if mix.is_fake(i)))
    assert draws[0] != draws[1]
    with pytest.raises(ValueError, match="ratio"):
        CopycatMix(real, fake, ratio=float("nan"))


def test_copycat_finetune_labels_with_the_final_output():
    net = tiny_net()
    unlabeled = quadrant_task(20, seed=4)
    fake = label_with_network(net, unlabeled)
    with torch.no_grad():
        expected = net.backbone.eval()(unlabeled.tensors[0]).argmax(-1)
    assert torch.equal(fake.labels, expected)
    hist = copycat_finetune(net, quadrant_task(16), unlabeled, ratio=2.0, batch_size=8, epochs=1, **QUIET)
    assert len(hist.epochs) == 1


def test_end_to_end_with_distillation_moves_the_backbone():
    net = tiny_net(freeze_backbone=False)
    before = copy.deepcopy(net.backbone.state_dict())
    hist = train_exits(net, loader(quadrant_task(32)), epochs=1, mode="end-to-end", loss_weights=[0.5, 0.5, 1.0],
                       distillation=Distillation(temperature=2.0, alpha=0.3), lr=1e-3, **QUIET)
    assert any(not torch.equal(before[k], v) for k, v in net.backbone.state_dict().items())
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in hist.epochs[0]["exits"])
    with pytest.raises(ValueError, match="freeze_backbone=False"):
        train_exits(tiny_net(), loader(quadrant_task(8)), epochs=1, mode="end-to-end", **QUIET)


def test_network_save_and_load_exits_methods(tmp_path):
    net, other = tiny_net(seed=0), tiny_net(seed=4)
    net.save_exits(str(tmp_path / "e.safetensors"))
    other.load_exits(str(tmp_path / "e.safetensors"))
    for k, v in net.exits.state_dict().items():
        assert torch.equal(other.exits.state_dict()[k], v)
