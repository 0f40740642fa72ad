"""The real-data workflow (#13 item 3): data loading, `slvit-fast train --data` + `evaluate`, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from slvit_fast.workflow import UsageError
from slvit_fast.workflow import data as D

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("run.json", "exits.safetensors", "policy.json", "report.json", "accuracy_flops.png")


def _cli(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "slvit_fast.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def _pattern(label: int, n: int, size: int, rng) -> np.ndarray:
    """(n, size, size, 3) uint8: class k brightens quadrant k, plus noise - learnable in an epoch or two."""
    x = rng.integers(0, 60, size=(n, size, size, 3)).astype(np.uint8)
    h = size // 2
    r, c = divmod(label, 2)
    x[:, r * h:(r + 1) * h, c * h:(c + 1) * h, :] += 150
    return x


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for k, name in enumerate(["cat", "dog", "owl"]):
        (root / name).mkdir()
        for i, img in enumerate(_pattern(k, 14, 16, rng)):
            Image.fromarray(img).save(root / name / f"{i}.png")
    (root / "notes.txt").write_text("not an image folder entry")
    return root


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    x = np.concatenate([_pattern(k, 16, 12, rng) for k in range(3)])  # (N, H, W, C) uint8
    y = np.repeat(np.array(["a", "b", "c"]), 16)
    path = tmp_path_factory.mktemp("npz") / "data.npz"
    np.savez(path, x=x, y=y)
    return path


# -- data loading ------------------------------------------------------------------------------------
def test_npz_layouts_give_the_same_images(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, size=(6, 5, 7, 3)).astype(np.uint8)
    y = np.array([3, 1, 3, 1, 7, 7])
    layouts = {"nhwc": nhwc, "nchw": nhwc.transpose(0, 3, 1, 2)}
    loaded = {}
    for name, x in layouts.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
        loaded[name] = D.load_images(tmp_path / f"{name}.npz")
    a, b = loaded["nhwc"], loaded["nchw"]
    assert a.classes == ["1", "3", "7"] and a.labels.tolist() == [1, 0, 1, 0, 2, 2]
    torch.testing.assert_close(a.x, torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(a.x, b.x)
    np.savez(tmp_path / "gray.npz", x=nhwc[..., 0].astype(np.float32), y=y)
    gray = D.load_images(tmp_path / "gray.npz")
    gray.configure(5, [0, 0, 0], [1, 1, 1])
    img, label = gray[0]
    assert img.shape == (3, 5, 5) and label == 1
    torch.testing.assert_close(img[0], img[2])  # grayscale repeated
    torch.testing.assert_close(img[0, :, :], torch.nn.functional.interpolate(
        torch.from_numpy(nhwc[:1, :, :, 0]).float()[None], size=(5, 5), mode="bilinear", antialias=True)[0, 0])


def test_npz_with_an_ambiguous_layout_needs_the_layout_key(tmp_path):
    """(N, 3, 4, 3) is NCHW with W = 3 or NHWC with H = 3: guessing would scramble pixels silently."""
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, size=(4, 3, 4, 3)).astype(np.uint8)
    y = np.array([0, 1, 0, 1])
    np.savez(tmp_path / "amb.npz", x=nhwc, y=y)
    with pytest.raises(UsageError, match=r"could be \(N, C, H, W\) or \(N, H, W, C\); add an array 'layout'"):
        D.load_images(tmp_path / "amb.npz")
    np.savez(tmp_path / "nhwc.npz", x=nhwc, y=y, layout="NHWC")
    torch.testing.assert_close(D.load_images(tmp_path / "nhwc.npz").x,
                               torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255)
    np.savez(tmp_path / "nchw.npz", x=nhwc, y=y, layout="NCHW")
    torch.testing.assert_close(D.load_images(tmp_path / "nchw.npz").x, torch.from_numpy(nhwc).float() / 255)
    np.savez(tmp_path / "bad.npz", x=nhwc, y=y, layout="HWC")
    with pytest.raises(UsageError, match="'layout' is 'HWC'"):
        D.load_images(tmp_path / "bad.npz")
    np.savez(tmp_path / "five.npz", x=np.zeros((4, 5, 8, 8)), y=y, layout="NCHW")
    with pytest.raises(UsageError, match="as NCHW has 5 channels"):
        D.load_images(tmp_path / "five.npz")


def test_image_folder_and_splits(image_folder):
    data = D.load_images(image_folder)
    assert data.classes == ["cat", "dog", "owl"] and len(data) == 42
    prep = D.prepare(data, 24, 0.2, 0.25, seed=3)
    again = D.split_indices(42, 0.2, 0.25, seed=3)
    assert prep.splits == again and D.split_indices(42, 0.2, 0.25, seed=4) != again
    parts = [set(v) for v in prep.splits.values()]
    assert sum(map(len, parts)) == 42 and set().union(*parts) == set(range(42))
    assert (len(prep.splits["test"]), len(prep.splits["val"])) == (10, 8)
    x = torch.stack([prep.data[i][0] for i in prep.splits["train"]])
    assert x.shape[1:] == (3, 24, 24)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)  # train-split statistics
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((4, 8, 8))}, r"needs arrays 'x' \(images\) and 'y'"),
    ({"x": np.zeros((4, 8, 8)), "y": np.zeros(3)}, "4 samples but 'y' has 3"),
    ({"x": np.zeros((4, 8, 8, 5)), "y": np.arange(4)}, r"\(N, C, H, W\) or \(N, H, W, C\)"),
    ({"x": np.zeros((4, 8)), "y": np.arange(4)}, "must be"),
    ({"x": np.zeros((4, 8, 8)), "y": np.zeros(4)}, "at least 2"),
])
def test_bad_npz_files_are_usage_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UsageError, match=match):
        D.load_images(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"no zip")
    with pytest.raises(UsageError, match="not a readable .npz"):
        D.load_images(tmp_path / "junk.npz")


# -- the command line --------------------------------------------------------------------------------
def _check_run_dir(out: Path, exit_type: str, n_exits: int) -> dict:
    for f in RUN_FILES:
        assert (out / f).is_file(), f
    assert (out / "accuracy_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert run["exit_type"] == exit_type and len(run["exit_modules"]) == n_exits
    rows = report["exits"]
    assert len(rows) == n_exits + 1 and rows[-1]["name"] == "final"
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    e = report["early_exit"]
    assert e["matches_brute_force"] is True and 0.0 <= e["accuracy"] <= 1.0
    assert sum(e["exit_counts"]) == report["test_samples"] and abs(sum(e["exit_fractions"]) - 1) < 1e-9
    costs = [r["cost_flops"] for r in rows]
    assert e["mean_flops"] == pytest.approx(sum(c * k for c, k in zip(costs, e["exit_counts"])) / report["test_samples"])
    assert e["flops_speedup"] == pytest.approx(rows[-1]["total_flops"] / e["mean_flops"])
    assert report["wall_clock"]["speedup"] > 0
    thresholds = json.loads((out / "policy.json").read_text())["thresholds"]
    assert len(thresholds) == n_exits
    return report


def _assert_evaluate_reproduces(out: Path, data: Path, report: dict, tmp_path: Path) -> str:
    result = _cli("evaluate", "--run", str(out), "--data", str(data), "--json", str(tmp_path / "eval.json"),
                  "--timing-repeats", "1")
    assert result.returncode == 0, result.stderr
    again = json.loads((tmp_path / "eval.json").read_text())
    assert [r["accuracy"] for r in again["exits"]] == [r["accuracy"] for r in report["exits"]]
    assert again["early_exit"]["accuracy"] == report["early_exit"]["accuracy"]
    assert again["early_exit"]["exit_counts"] == report["early_exit"]["exit_counts"]
    assert "early exit MaxSoftmax" in result.stdout and "final" in result.stdout
    return result.stdout


def test_cli_train_and_evaluate_on_an_image_folder(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    result = _cli("train", "--data", str(image_folder), "--backbone", "resnet18", "--input-size", "32",
                  "--out", str(out), "--epochs", "3", "--batch-size", "16", "--train-backbone-epochs", "1",
                  "--val-fraction", "0.2", "--test-fraction", "0.25", "--timing-repeats", "1")
    assert result.returncode == 0, result.stderr
    report = _check_run_dir(out, "slvit", 2)
    assert report["test_samples"] == 10 and (out / "backbone.safetensors").is_file()
    assert json.loads((out / "run.json").read_text())["weights"] == "backbone.safetensors"
    for phase in ("data: 42 images", "fine-tuning the whole backbone", "backbone epoch 1/1", "epoch 1/3",
                  "calibrated MaxSoftmax", "early exit MaxSoftmax"):
        assert phase in result.stdout, phase
    assert "Traceback" not in result.stderr and "random weights" not in result.stderr
    _assert_evaluate_reproduces(out, image_folder, report, tmp_path)
    # the same run evaluated as deployed on CPU: BatchNorms folded, channels_last, same answers
    result = _cli("evaluate", "--run", str(out), "--data", str(image_folder), "--json", str(tmp_path / "prep.json"),
                  "--timing-repeats", "1", "--prepare-inference")
    assert result.returncode == 0, result.stderr
    prepared = json.loads((tmp_path / "prep.json").read_text())
    assert prepared["prepared"]["memory_format"] == "channels_last" and prepared["prepared"]["batchnorms_folded"] >= 15
    assert prepared["prepared"]["exit_weights_huge_page_bytes"] is not None  # the exits were moved too
    assert "BatchNorms folded" in result.stdout
    assert prepared["early_exit"]["matches_brute_force"] is True
    n = report["test_samples"]
    assert abs(prepared["early_exit"]["accuracy"] - report["early_exit"]["accuracy"]) <= 1 / n + 1e-9
    for a, b in zip(prepared["exits"], report["exits"]):
        assert abs(a["accuracy"] - b["accuracy"]) <= 1 / n + 1e-9
    # a damaged run directory is a one-line error too
    from slvit_fast.cli import main

    (out / "backbone.safetensors").rename(tmp_path / "moved.safetensors")
    assert main(["evaluate", "--run", str(out), "--data", str(image_folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot rebuild the run" in err[0] and "backbone.safetensors" in err[0]


def test_cli_train_and_evaluate_on_an_npz_with_a_weights_file(npz_file, tmp_path):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "imagenet_like.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)
    out = tmp_path / "run"
    result = _cli("train", "--data", str(npz_file), "--backbone", "resnet18", "--weights", str(weights),
                  "--exits", "layer1,layer3", "--exit-type", "cnn", "--input-size", "32", "--out", str(out),
                  "--epochs", "2", "--batch-size", "16", "--fractions", "0.4,0.3", "--timing-repeats", "1")
    assert result.returncode == 0, result.stderr
    report = _check_run_dir(out, "cnn", 2)
    assert [r["module"] for r in report["exits"][:2]] == ["layer1", "layer3"]
    assert report["calibration"]["method"] == "fractions"
    assert "classifier was replaced for 3 classes" in result.stderr  # untrained final output warned about
    assert "'fc' has 1000 outputs" in result.stdout + result.stderr
    _assert_evaluate_reproduces(out, npz_file, report, tmp_path)


def test_cli_warns_about_a_random_untrained_backbone(npz_file, tmp_path):
    result = _cli("train", "--data", str(npz_file), "--backbone", "resnet18", "--input-size", "16",
                  "--out", str(tmp_path / "r"), "--epochs", "1", "--timing-repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "warning: the backbone has random weights and --train-backbone-epochs is 0" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--backbone", "resnt18", "--data", "x.npz", "--out", "o"], "did you mean 'resnet18'"),
    (["train", "--backbone", "resnt18"], "did you mean 'resnet18'"),
    (["summary", "densenet12"], "did you mean 'densenet121'"),
    (["train", "--backbone", "resnet18", "--data", "/no/such/data", "--out", "o"], "does not exist"),
    (["train", "--backbone", "resnet18", "--data", "BAD", "--out", "o"], "needs arrays 'x'"),
    (["train", "--backbone", "resnet18", "--data", "BAD", "--out", "o", "--budget", "1M", "--fractions", "0.5"],
     "not allowed with argument --budget"),
    (["train", "--backbone", "resnet18", "--data", "BAD"], "needs --out"),
    (["train", "--backbone", "resnet18", "--weights", "IMAGENET1K_V1"], "need --data"),
    (["train", "--backbone", "resnet18", "--data", "BAD", "--out", "o", "--budget", "lots"], "number of FLOPs"),
    (["evaluate", "--run", "/no/such/run", "--data", "BAD"], "does not exist"),
    (["train", "--backbone", "resnet18", "--data", "GOOD", "--out", "o", "--exits", "layer9"],
     "--exits: module path 'layer9' is not a submodule"),
    (["train", "--backbone", "resnet18", "--data", "GOOD", "--out", "o", "--exits", "fc"], "not a (B, C, H, W)"),
    (["train", "--backbone", "inception_v3", "--data", "GOOD", "--out", "o", "--input-size", "16"],
     "--input-size 16 does not fit inception_v3"),
    (["train", "--backbone", "resnet18", "--data", "GOOD", "--out", "o", "--weights", "IMAGENET9K"],
     "unknown weights 'IMAGENET9K'"),
    (["train", "--backbone", "resnet34", "--data", "GOOD", "--out", "o", "--weights", "R18"], "do not fit backbone 'resnet34'"),
    (["train", "--backbone", "resnet18", "--data", "BAD", "--out", "o", "--weights", "missing.pt"], "does not exist"),
])
def test_usage_errors_are_one_line_with_exit_code_2(tmp_path, args, message, capsys):
    """In process (fast): ``main`` returns 2 or argparse exits with 2, one line on stderr."""
    from slvit_fast.cli import main

    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 8, 8)))
    np.savez(tmp_path / "good.npz", x=np.zeros((20, 8, 8), dtype=np.uint8), y=np.arange(20) % 2)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "r18.pt")
    files = {"BAD": tmp_path / "bad.npz", "GOOD": tmp_path / "good.npz", "R18": tmp_path / "r18.pt"}
    args = [str(files[a]) if a in files else a for a in args]
    args = [str(tmp_path / "o") if a == "o" else a for a in args]
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"slvit-fast {args[0]}: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "o").exists()  # nothing written before the arguments were checked


def test_usage_error_in_a_real_process_has_no_traceback(tmp_path):
    result = _cli("train", "--backbone", "resnet18", "--data", str(tmp_path / "nothing.npz"), "--out", "o")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"slvit-fast train: error: data path '{tmp_path / 'nothing.npz'}' does not exist"


def test_float_images_outside_unit_range_are_flagged(tmp_path, caplog):
    """Float images are used as given; values outside [0, 1] (e.g. 0-255 floats) get a warning naming the
    range, since torchvision weights expect [0, 1]."""
    import logging

    path = tmp_path / "f.npz"
    np.savez(path, x=np.full((4, 8, 8), 200.0, dtype=np.float32), y=np.array([0, 1, 0, 1]))
    with caplog.at_level(logging.WARNING, logger="slvit_fast.workflow"):
        D.load_images(path)
    assert any("not [0, 1]" in r.getMessage() for r in caplog.records)
    caplog.clear()
    np.savez(path, x=np.full((4, 8, 8), 0.5, dtype=np.float32), y=np.array([0, 1, 0, 1]))
    with caplog.at_level(logging.WARNING, logger="slvit_fast.workflow"):
        D.load_images(path)
    assert not caplog.records
