"""The feature cache is used only when it holds exactly this run's features (issue 12 item 1).

Every test compares training from the cache with live training (the backbone run every batch) on the
same network and data: a stale cache shows up as different losses.
"""

import json
import logging

import pytest
import torch

from training_fixtures import loader, quadrant_task, tiny_backbone, tiny_net
from slvit_fast.multi_exit import MultiExitNetwork
from slvit_fast.training import FeatureCacheError, FeatureCacheMismatchError, train_exits

QUIET = dict(progress=False, epochs=2, lr=2e-3)


def _val_losses(hist):
    return [hist.exit_series(i, "val_loss") for i in range(len(hist.epochs[0]["exits"]))]


def _assert_cache_equals_live(make_net, train, val, cache_dir, **kw):
    h_live = train_exits(make_net(), train, val, **QUIET)
    h_cache = train_exits(make_net(), train, val, cache_dir=cache_dir, shuffle_cache=False, **QUIET, **kw)
    for live, cached in zip(_val_losses(h_live), _val_losses(h_cache)):
        assert cached == pytest.approx(live, rel=1e-5)
    return h_cache


def test_other_data_of_the_same_size_rebuilds(tmp_path, caplog):
    val = loader(quadrant_task(16, seed=1))
    _assert_cache_equals_live(tiny_net, loader(quadrant_task(32, seed=0)), val, tmp_path)
    with caplog.at_level(logging.INFO, logger="slvit_fast"):
        h = _assert_cache_equals_live(tiny_net, loader(quadrant_task(32, seed=5)), val, tmp_path)
    assert h.cache_seconds > 0  # built again (train split), not reused
    assert any("data.first" in r.getMessage() and "data.last" in r.getMessage() for r in caplog.records)


def test_other_backbone_buffers_rebuild(tmp_path, caplog):
    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    _assert_cache_equals_live(tiny_net, train, val, tmp_path)

    def shifted():  # same weights, other BatchNorm running statistics: other features
        net = tiny_net()
        net.backbone[1].running_mean += 0.5
        return net

    with caplog.at_level(logging.INFO, logger="slvit_fast"):
        _assert_cache_equals_live(shifted, train, val, tmp_path)
    assert any("backbone" in r.getMessage() for r in caplog.records)


def test_fewer_samples_rebuild(tmp_path, caplog):
    val = loader(quadrant_task(16, seed=1))
    _assert_cache_equals_live(tiny_net, loader(quadrant_task(64)), val, tmp_path)
    with caplog.at_level(logging.INFO, logger="slvit_fast"):
        _assert_cache_equals_live(tiny_net, loader(quadrant_task(32)), val, tmp_path)
    assert any("data.samples: 64 -> 32" in r.getMessage() for r in caplog.records)


def _one_exit_net():
    net = tiny_net()
    return MultiExitNetwork(tiny_backbone(), {"5": net.exits["5"]})


def test_other_number_of_exits_rebuilds(tmp_path, caplog):
    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    _assert_cache_equals_live(tiny_net, train, val, tmp_path)
    with caplog.at_level(logging.INFO, logger="slvit_fast"):
        _assert_cache_equals_live(_one_exit_net, train, val, tmp_path)
    assert any("exits: 2 -> 1 exits" in r.getMessage() for r in caplog.records)


def test_strict_policy_raises_naming_the_field(tmp_path):
    val = loader(quadrant_task(16, seed=1))
    train_exits(tiny_net(), loader(quadrant_task(32)), val, cache_dir=tmp_path, **QUIET)
    with pytest.raises(FeatureCacheMismatchError, match=r"data\.samples: 32 -> 48"):
        train_exits(tiny_net(), loader(quadrant_task(48)), val, cache_dir=tmp_path, cache_policy="strict", **QUIET)
    # a matching cache is fine under "strict"
    h = train_exits(tiny_net(), loader(quadrant_task(32)), val, cache_dir=tmp_path, cache_policy="strict", **QUIET)
    assert h.cache_seconds == 0


def test_cache_key_replaces_the_data_hash(tmp_path, caplog):
    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    h1 = train_exits(tiny_net(), train, val, cache_dir=tmp_path, cache_key="v1", **QUIET)
    h2 = train_exits(tiny_net(), train, val, cache_dir=tmp_path, cache_key="v1", **QUIET)
    assert h1.cache_seconds > 0 and h2.cache_seconds == 0
    with caplog.at_level(logging.INFO, logger="slvit_fast"):
        h3 = train_exits(tiny_net(), train, val, cache_dir=tmp_path, cache_key="v2", **QUIET)
    assert h3.cache_seconds > 0
    assert any("data.cache_key: 'v1' -> 'v2'" in r.getMessage() for r in caplog.records)


def test_rebuild_policy_builds_again(tmp_path):
    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    train_exits(tiny_net(), train, val, cache_dir=tmp_path, **QUIET)
    h = _assert_cache_equals_live(tiny_net, train, val, tmp_path, cache_policy="rebuild")
    assert h.cache_seconds > 0
    assert len([p for p in (tmp_path / "train").iterdir() if not p.name.startswith(".")]) == 1
    with pytest.raises(ValueError, match="cache_policy must be one of"):
        train_exits(tiny_net(), train, val, cache_dir=tmp_path, cache_policy="sometimes", **QUIET)


@pytest.mark.parametrize("damage", ["truncate", "delete", "meta"])
def test_damaged_cache_is_an_error_naming_the_folder(tmp_path, damage):
    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    train_exits(tiny_net(), train, val, cache_dir=tmp_path, **QUIET)
    feat = next((tmp_path / "train").rglob("feat0.npy"))
    if damage == "truncate":
        feat.write_bytes(feat.read_bytes()[:-100])
    elif damage == "delete":
        (feat.parent / "targets.npy").unlink()
    else:
        (feat.parent / "meta.json").write_text("{not json")
    with pytest.raises(FeatureCacheError) as err:
        train_exits(tiny_net(), train, val, cache_dir=tmp_path, **QUIET)
    msg = str(err.value)
    assert str(feat.parent) in msg and "cache_policy='rebuild'" in msg
    h = _assert_cache_equals_live(tiny_net, train, val, tmp_path, cache_policy="rebuild")
    assert h.cache_seconds > 0


def test_cache_from_an_older_version_is_not_read(tmp_path, caplog):
    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    other = loader(quadrant_task(32, seed=8))
    train_exits(tiny_net(), other, val, cache_dir=tmp_path, **QUIET)
    # make it look like the old layout: files directly in <cache_dir>/train, meta without a fingerprint
    folder = next((tmp_path / "train").rglob("meta.json")).parent
    for p in folder.iterdir():
        p.rename(tmp_path / "train" / p.name)
    meta = json.loads((tmp_path / "train" / "meta.json").read_text())
    (tmp_path / "train" / "meta.json").write_text(json.dumps({k: meta[k] for k in ("size", "num_exits", "has_extra")}))
    with caplog.at_level(logging.INFO, logger="slvit_fast"):
        _assert_cache_equals_live(tiny_net, train, val, tmp_path)
    assert any("older slvit_fast" in r.getMessage() for r in caplog.records)


def test_cached_features_of_another_network_are_a_clear_error(tmp_path):
    from slvit_fast.training import FeatureCache
    from slvit_fast.training.sources import BatchSource

    cache = FeatureCache.build(tiny_net(), loader(quadrant_task(8)), tmp_path / "c", progress=False)
    with pytest.raises(FeatureCacheError, match=r"holds features for 2 exits, the network has 1"):
        BatchSource(_one_exit_net(), None, torch.device("cpu"), cache)
