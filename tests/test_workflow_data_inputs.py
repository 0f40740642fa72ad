"""Awkward user inputs to the workflow's data loading and backbone fine-tuning (session 10 review):
high-bit-depth images, NaN labels, files that are not images, and 1-sample BatchNorm batches."""

from __future__ import annotations

import logging

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slvit_fast.workflow import UsageError
from slvit_fast.workflow import data as D
from slvit_fast.workflow.finetune import finetune_backbone

Image = pytest.importorskip("PIL.Image")


def _gray_images(n: int = 6, size: int = 8) -> np.ndarray:
    """(n, size, size) uint8 covering the whole 0..255 range (both ends included)."""
    x = np.random.default_rng(0).integers(0, 256, size=(n, size, size)).astype(np.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, 255
    return x


def _folder(root, images, save) -> None:
    for i, img in enumerate(images):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        save(img, d / f"{i}")


def _raw_all(path, size: int = 8) -> torch.Tensor:
    ds = D.load_images(path)
    ds.configure(size, [0.0] * 3, [1.0] * 3)
    return torch.stack([ds.raw(i) for i in range(len(ds))])


# ---- 16-bit, 32-bit integer and float images -------------------------------------------------------------

def test_16bit_png_folder_loads_like_its_8bit_original(tmp_path):
    """A 16-bit copy (v * 257) of 8-bit images gives exactly the 8-bit path's floats (v / 255), at the
    original size and resized; the old code clipped 16-bit values at 255 (black and white)."""
    x = _gray_images()
    _folder(tmp_path / "8", x, lambda a, p: Image.fromarray(a).save(f"{p}.png"))
    _folder(tmp_path / "16", x, lambda a, p: Image.fromarray(a.astype(np.uint16) * 257).save(f"{p}.png"))
    with Image.open(next((tmp_path / "16" / "c0").iterdir())) as im:
        assert im.mode == "I;16"
    for size in (8, 5, 12):
        r8, r16 = _raw_all(tmp_path / "8", size), _raw_all(tmp_path / "16", size)
        assert torch.equal(r8, r16), (r8 - r16).abs().max()
    r16 = _raw_all(tmp_path / "16")
    assert r16.unique().numel() > 100
    # exact values: sample i is file i of the sorted listing (c0: 0, 2, 4; c1: 1, 3, 5)
    order = [0, 2, 4, 1, 3, 5]
    expect = torch.from_numpy(x[order].astype(np.float32))[:, None].expand(-1, 3, -1, -1) / 255.0
    assert torch.equal(r16, expect)


def test_8bit_values_in_a_16bit_file_are_warned_about_once(tmp_path, monkeypatch, caplog):
    """Image.fromarray(a.astype(np.uint16)) keeps 8-bit values in a 16-bit file: scaled by 1/65535 they are
    ~257x darker than the 8-bit path; nothing can tell that from intent, so it is a warning (review 10)."""
    monkeypatch.setattr(D, "_warned_8bit_range", False)
    x = _gray_images()
    _folder(tmp_path / "16", x, lambda a, p: Image.fromarray(a.astype(np.uint16)).save(f"{p}.png"))
    with caplog.at_level("WARNING", logger="slvit_fast.workflow"):
        _raw_all(tmp_path / "16")
    warned = [r.getMessage() for r in caplog.records if "values are all <= 255" in r.getMessage()]
    assert len(warned) == 1 and "~257x darker" in warned[0], warned
    caplog.clear()  # a real 16-bit image (values past 255) is not warned about
    monkeypatch.setattr(D, "_warned_8bit_range", False)
    _folder(tmp_path / "16b", x, lambda a, p: Image.fromarray(a.astype(np.uint16) * 257).save(f"{p}.png"))
    with caplog.at_level("WARNING", logger="slvit_fast.workflow"):
        _raw_all(tmp_path / "16b")
    assert not [r for r in caplog.records if "values are all <= 255" in r.getMessage()]


def test_big_endian_16bit_and_mode_I_tiff_are_scaled_by_65535(tmp_path):
    v = np.array([[0, 1, 1000, 40000], [65535, 257, 3, 65534]], dtype=np.uint16)
    expect = torch.from_numpy(v.astype(np.float32)) / 65535.0
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.frombytes("I;16B", (4, 2), v.astype(">u2").tobytes()).save(tmp_path / "a" / "be.tif")
    Image.fromarray(v.astype(np.int32)).save(tmp_path / "b" / "i.tif")
    with Image.open(tmp_path / "b" / "i.tif") as im:
        assert im.mode == "I"
    ds = D.load_images(tmp_path)
    ds.configure(4, [0.0] * 3, [1.0] * 3)
    assert all(ds.raw(i).shape == (3, 4, 4) for i in range(2))  # 2x4 resized; values checked unresized below
    for f in ds.files:
        assert torch.equal(D._read_image(f), expect[None])


def test_mode_I_outside_16bit_range_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "a" / "big.tif")
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "b" / "ok.png")
    ds = D.load_images(tmp_path)
    ds.configure(2, [0.0] * 3, [1.0] * 3)
    with pytest.raises(UsageError, match=r"big\.tif: a 32-bit integer image \(mode 'I'\) with values in \[0, 70000\]"):
        ds.raw(0)


def test_float_images_are_used_as_is_in_unit_range_else_an_error(tmp_path):
    good = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    for name, arr in (("good", good), ("big", good * 255), ("nan", np.array([[np.nan, 0.5]], dtype=np.float32))):
        (tmp_path / name).mkdir()
        Image.fromarray(arr).save(tmp_path / name / f"{name}.tif")
    ds = D.load_images(tmp_path)
    ds.configure(2, [0.0] * 3, [1.0] * 3)
    by_name = {f.split("/")[-1]: i for i, f in enumerate(ds.files)}
    assert torch.equal(ds.raw(by_name["good.tif"]), torch.from_numpy(good)[None].expand(3, -1, -1))
    with pytest.raises(UsageError, match=r"big\.tif: a floating-point image \(mode 'F'\).*\[0, 255\]"):
        ds.raw(by_name["big.tif"])
    with pytest.raises(UsageError, match=r"nan\.tif: a floating-point image"):
        ds.raw(by_name["nan.tif"])


def test_8bit_modes_are_unchanged(tmp_path):
    """L, RGB, RGBA, P, LA go through convert("RGB") / 255 as before."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(6, 5, 3)).astype(np.uint8)
    base = Image.fromarray(rgb)
    for mode in ("L", "RGB", "RGBA", "P", "LA", "1"):
        im = base.convert(mode)
        path = tmp_path / f"{mode}.png"
        im.save(path)
        with Image.open(path) as back:
            expect = torch.from_numpy(np.asarray(back.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        assert torch.equal(D._read_image(str(path)), expect), mode


# ---- labels ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_labels_are_an_error_naming_the_first(tmp_path, bad):
    y = np.array([0.0, 1.0, bad, 1.0, bad, 0.0])
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 4, 4), dtype=np.uint8), y=y)
    with pytest.raises(UsageError, match=r"'y' has 2 NaN or infinite label\(s\), the first at index 2"):
        D.load_images(tmp_path / "d.npz")
    np.savez(tmp_path / "s.npz", x=np.zeros((2, 4, 4), dtype=np.uint8), y=np.array(["nan", "b"]))
    assert D.load_images(tmp_path / "s.npz").classes == ["b", "nan"]  # a string "nan" is just a name


# ---- files that are not images -----------------------------------------------------------------------------

def _two_classes(root, n=4):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((4, 4), 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")


def test_a_non_image_png_is_a_usage_error_at_load(tmp_path):
    _two_classes(tmp_path)
    (tmp_path / "b" / "broken.png").write_text("<html>not found</html>")
    with pytest.raises(UsageError, match=r"b/broken\.png: not a readable image \(UnidentifiedImageError"):
        D.load_images(tmp_path)


def test_a_truncated_png_is_a_usage_error_when_decoded_also_in_a_loader(tmp_path):
    _two_classes(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "a" / "t.png")
    data = (tmp_path / "a" / "t.png").read_bytes()
    (tmp_path / "a" / "t.png").write_bytes(data[:len(data) // 2])  # header fine, pixels cut off
    ds = D.load_images(tmp_path)
    ds.configure(4, [0.0] * 3, [1.0] * 3)
    with pytest.raises(UsageError, match=r"a/t\.png: not a readable image"):
        for _ in D.loader(ds, batch_size=3):
            pass


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_truncated_val_or_test_image_stops_train_before_out_is_touched(tmp_path, monkeypatch, split):
    """The test split is first decoded by the evaluation after training: a truncated file there used to end a
    finished training run with an error. Now every val/test image is decoded before OUT is created."""
    from slvit_fast.workflow import RunSpec, run_experiment
    from slvit_fast.workflow import experiment as E

    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32), dtype=np.uint8)).save(root / c / f"{i}.png")
    images = D.load_images(root)
    splits = D.split_indices(len(images), 0.15, 0.15, 0)
    victim = Path(images.files[splits[split][0]])
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])  # header fine, pixels cut off
    monkeypatch.setattr(E, "train_exits", lambda *a, **k: pytest.fail("exit training started"))
    out = tmp_path / "o"
    with pytest.raises(UsageError, match=rf"{victim.parent.name}/{victim.name}: not a readable image"):
        run_experiment(RunSpec(data=str(root), backbone="resnet18", out=str(out), input_size=16, epochs=1,
                               batch_size=4, timing_repeats=1))
    assert not out.exists()


def test_cli_reports_a_non_image_file_in_one_line_with_exit_code_2(tmp_path, capsys):
    from slvit_fast.cli import main

    _two_classes(tmp_path / "data")
    (tmp_path / "data" / "a" / "x.png").write_bytes(b"\x00" * 100)
    code = main(["train", "--backbone", "resnet18", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"slvit-fast train: error: {tmp_path / 'data' / 'a' / 'x.png'}: not a readable image")
    assert not (tmp_path / "o").exists()


# ---- fine-tuning with 1-sample batches ---------------------------------------------------------------------

def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm1d after pooling: a 1-sample batch has one value per channel (what crashed in resnet18's layer4)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 3))


def _task(n: int):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_a_last_batch_of_one_is_skipped_and_equals_training_without_that_sample(caplog):
    data9 = _task(9)
    data8 = TensorDataset(*data9[:8])
    val = DataLoader(_task(6), batch_size=4)
    a, b = _bn_net(), _bn_net()
    with caplog.at_level(logging.INFO, logger="slvit_fast.workflow"):
        ha = finetune_backbone(a, DataLoader(data9, batch_size=4), val, epochs=2, seed=3)  # batches 4, 4, 1
    assert sum("skips 1 sample(s) per epoch" in r.getMessage() for r in caplog.records) == 1
    hb = finetune_backbone(b, DataLoader(data8, batch_size=4), val, epochs=2, seed=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert [e["train_loss"] for e in ha["epochs"]] == [e["train_loss"] for e in hb["epochs"]]


def test_shuffled_loader_with_a_last_batch_of_one_runs():
    net = _bn_net()
    loader = DataLoader(_task(7), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    out = finetune_backbone(net, loader, DataLoader(_task(4), batch_size=4), epochs=2)
    assert len(out["epochs"]) == 2 and all(np.isfinite(e["train_loss"]) for e in out["epochs"])


@pytest.mark.parametrize("n, batch", [(5, 1), (1, 64)])
def test_only_single_sample_batches_is_a_usage_error_before_training(n, batch):
    net = _bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UsageError, match=rf"batch size {batch} and {n} training sample\(s\).*--batch-size 2 or more"):
        finetune_backbone(net, DataLoader(_task(n), batch_size=batch), DataLoader(_task(4), batch_size=4), epochs=1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_without_batchnorm_single_sample_batches_still_train():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(108, 3))
    w0 = net[1].weight.detach().clone()
    finetune_backbone(net, DataLoader(_task(3), batch_size=1), DataLoader(_task(2), batch_size=2), epochs=1)
    assert not torch.equal(w0, net[1].weight)


def test_cli_batch_size_1_with_backbone_training_is_a_usage_error(tmp_path, capsys):
    from slvit_fast.cli import main

    np.savez(tmp_path / "d.npz", x=np.zeros((20, 8, 8), dtype=np.uint8), y=np.arange(20) % 2)
    code = main(["train", "--backbone", "resnet18", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "o"),
                 "--input-size", "32", "--batch-size", "1", "--train-backbone-epochs", "1", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--batch-size 2 or more" in err
