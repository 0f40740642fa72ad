"""A damaged feature cache is an error naming the folder and the file, never silently used (finding F4).

Every data file of a cache carries a checksum in its meta.json, written before the cache is published
and checked before any data is served. One flipped byte in a feature file used to train to a loss of
3e33 (or NaN), one in the labels to a raw IndexError far from the cause.
"""

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training_fixtures import loader, quadrant_task, tiny_net
from slvit_fast.training import FeatureCache, FeatureCacheError, FeatureCacheMismatchError, train_exits
from slvit_fast.training import feature_cache as fc_module

QUIET = dict(progress=False, epochs=2, lr=2e-3)


def _flip_data_byte(path, frac=0.5):
    """XOR one byte inside the array data of ``path`` (past the .npy header), as a bad disk block would."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read_header(f)
        start = f.tell()
    data = bytearray(path.read_bytes())
    pos = start + min(int((len(data) - start) * frac), len(data) - start - 1)
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


class _StubNet(nn.Module):
    """branch_features with one exit that has an extra input, so every kind of cache file is written."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def branch_features(self, x):
        return [(x * self.w, x[:, :2] + 1.0), x.sum(1, keepdim=True)]


def _stub_cache(tmp_path, fingerprint=None):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g))
    return FeatureCache.build(_StubNet(), DataLoader(ds, batch_size=8), tmp_path / "c", progress=False,
                              fingerprint=fingerprint)


def test_published_meta_records_a_checksum_of_every_file(tmp_path):
    cache = _stub_cache(tmp_path)
    meta = json.loads((cache.directory / "meta.json").read_text())
    files = sorted(p.name for p in cache.directory.glob("*.npy"))
    assert files == ["extra0.npy", "feat0.npy", "final.npy", "targets.npy"]
    assert meta["checksums"]["algorithm"] == "crc32"
    assert sorted(meta["checksums"]["files"]) == files
    for name in files:
        assert meta["checksums"]["files"][name] == fc_module.file_checksum(cache.directory / name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build folder left behind


@pytest.mark.parametrize("name", ["feat0.npy", "extra0.npy", "targets.npy", "final.npy"])
@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_one_flipped_byte_in_any_data_file_is_an_error_naming_it(tmp_path, name, where):
    folder = _stub_cache(tmp_path).directory
    _flip_data_byte(folder / name, where)
    loads = []
    real_load = np.load
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fc_module.np, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
        with pytest.raises(FeatureCacheError) as err:
            FeatureCache(folder)
    msg = str(err.value)
    assert str(folder) in msg and name in msg and "checksum" in msg
    assert "cache_policy='rebuild'" in msg and "delete that folder" in msg
    assert loads == []  # no file was even mapped, let alone served


@pytest.mark.parametrize("field", ["fingerprint", "checksum"])
def test_a_flipped_byte_in_meta_json_is_an_error(tmp_path, field):
    folder = _stub_cache(tmp_path, fingerprint={"data": "0123456789abcdef"}).directory
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    old = "0123456789abcdef" if field == "fingerprint" else meta.get("checksums", {}).get("files", {}).get("feat0.npy", "")
    new = old[:3] + ("0" if old[3] != "0" else "1") + old[4:]  # one hex digit of a value
    meta_path.write_text(meta_path.read_text().replace(f'"{old}"', f'"{new}"', 1))
    with pytest.raises(FeatureCacheError, match=r"meta\.json does not match its own checksum") as err:
        FeatureCache(folder)
    assert str(folder) in str(err.value)


def test_truncated_file_still_names_the_file(tmp_path):
    folder = _stub_cache(tmp_path).directory
    path = folder / "targets.npy"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(FeatureCacheError, match=r"targets\.npy has \d+ bytes, \d+ were written"):
        FeatureCache(folder)


@pytest.mark.parametrize("name", ["feat0.npy", "targets.npy"])  # the two cases of the report
def test_train_exits_refuses_a_cache_with_a_flipped_byte(tmp_path, name):
    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    train_exits(tiny_net(), train, val, cache_dir=tmp_path, **QUIET)
    folder = next((tmp_path / "train").rglob("meta.json")).parent
    _flip_data_byte(folder / name)
    with pytest.raises(FeatureCacheError) as err:
        train_exits(tiny_net(), train, val, cache_dir=tmp_path, **QUIET)
    msg = str(err.value)
    assert str(folder) in msg and name in msg and "cache_policy='rebuild'" in msg
    # the advertised way out works: rebuild, then the intact cache is read again
    h = train_exits(tiny_net(), train, val, cache_dir=tmp_path, cache_policy="rebuild", **QUIET)
    assert h.cache_seconds > 0
    assert train_exits(tiny_net(), train, val, cache_dir=tmp_path, **QUIET).cache_seconds == 0


def test_an_intact_cache_is_reused_with_identical_results(tmp_path, caplog):
    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    h1 = train_exits(tiny_net(), train, val, cache_dir=tmp_path, shuffle_cache=False, **QUIET)
    with caplog.at_level(logging.INFO, logger="slvit_fast"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(fc_module, "_LOG_VERIFY_BYTES", 0)  # this small cache counts as large: the info line shows
        h2 = train_exits(tiny_net(), train, val, cache_dir=tmp_path, shuffle_cache=False, **QUIET)
    assert h1.cache_seconds > 0 and h2.cache_seconds == 0
    for i in range(2):
        for key in ("train_loss", "val_loss"):
            assert h2.exit_series(i, key) == h1.exit_series(i, key)  # bit-identical
    assert sum("verifying the checksums of feature cache" in r.getMessage() for r in caplog.records) == 2  # train, val


def _strip_checksums(tmp_path):
    """Make every cache under tmp_path look written by the version before checksums (same fingerprint)."""
    folders = [p.parent for p in tmp_path.rglob("meta.json")]
    for folder in folders:
        meta = json.loads((folder / "meta.json").read_text())
        del meta["checksums"]
        (folder / "meta.json").write_text(json.dumps(meta))
    return folders


def test_a_cache_without_checksums_is_rebuilt_under_auto(tmp_path, caplog):
    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    h_live = train_exits(tiny_net(), train, val, **QUIET)
    train_exits(tiny_net(), train, val, cache_dir=tmp_path, **QUIET)
    folders = _strip_checksums(tmp_path)
    _flip_data_byte(folders[0] / "feat0.npy")  # what an unverifiable cache could hold
    with caplog.at_level(logging.INFO, logger="slvit_fast"):
        h = train_exits(tiny_net(), train, val, cache_dir=tmp_path, shuffle_cache=False, **QUIET)
    assert h.cache_seconds > 0
    assert sum("recorded no checksums" in r.getMessage() for r in caplog.records) == 2  # train and val
    for i in range(2):
        assert h.exit_series(i, "val_loss") == pytest.approx(h_live.exit_series(i, "val_loss"), rel=1e-5)
    for folder in folders:  # rebuilt in place, now with checksums
        assert "checksums" in json.loads((folder / "meta.json").read_text())
    assert len([p for p in (tmp_path / "train").iterdir() if not p.name.startswith(".")]) == 1


def test_a_cache_without_checksums_is_an_error_under_strict_and_when_opened(tmp_path):
    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    train_exits(tiny_net(), train, val, cache_dir=tmp_path, **QUIET)
    folders = _strip_checksums(tmp_path)
    with pytest.raises(FeatureCacheMismatchError, match="recorded no checksums") as err:
        train_exits(tiny_net(), train, val, cache_dir=tmp_path, cache_policy="strict", **QUIET)
    assert any(str(f) in str(err.value) for f in folders)
    for folder in folders:
        with pytest.raises(FeatureCacheError, match=r"recorded no checksums.*cache_policy='rebuild'"):
            FeatureCache(folder)
