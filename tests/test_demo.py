"""The digits demo (#13 item 7) on a reduced setting: the pipeline, its values and its files."""

from __future__ import annotations

import json

import pytest
import torch

from slvit_fast import policies, presets
from slvit_fast.workflow import data as D
from slvit_fast.workflow.digits import run_digits_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    reports = run_digits_demo(out=out, samples=400, backbone_epochs=1, exit_epochs=3, timing_repeats=1)
    return out, reports


def test_demo_reports_values_for_both_exit_types(demo):
    out, reports = demo
    assert set(reports) == {"slvit", "cnn"}
    for kind, rep in reports.items():
        assert rep["test_samples"] == 60
        assert [r["name"] for r in rep["exits"]] == ["b1", "b2", "final"]
        assert [r["features"] for r in rep["exits"][:2]] == [[64, 8, 8], [128, 4, 4]]
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in rep["exits"])
        e = rep["early_exit"]
        assert e["matches_brute_force"] is True and 0.0 <= e["accuracy"] <= 1.0
        assert 0 < e["mean_flops"] <= rep["exits"][-1]["cost_flops"] and e["flops_speedup"] > 1.0
        assert rep["wall_clock"]["speedup"] > 0
        assert json.loads((out / kind / "report.json").read_text())["early_exit"]["accuracy"] == e["accuracy"]
    # the paper's comparison: the SL-ViT exit is not larger than the CNN exit at the same branch
    for s, c in zip(reports["slvit"]["exits"][:2], reports["cnn"]["exits"][:2]):
        assert s["params"] <= c["params"] and s["exit_flops"] <= c["exit_flops"]
    # the same backbone under both exit types (its cost_flops differ: a sample reaching the end paid the exits)
    keys = ("params", "total_flops", "accuracy")
    assert [reports["slvit"]["exits"][-1][k] for k in keys] == [reports["cnn"]["exits"][-1][k] for k in keys]


def test_demo_writes_its_files(demo):
    out, _ = demo
    for f in ("digits.npz", "backbone.safetensors", "accuracy_flops.png"):
        assert (out / f).is_file(), f
    for kind in ("slvit", "cnn"):
        for f in ("run.json", "exits.safetensors", "policy.json", "report.json", "accuracy_flops.png"):
            assert (out / kind / f).is_file(), (kind, f)
    assert (out / "accuracy_flops.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_early_exit_equals_brute_force_on_the_saved_run(demo):
    """Rebuilt from the run directory: net.early_exit on the test split equals every exit on every sample
    followed by policies.apply, and its accuracy is the one the report states."""
    out, reports = demo
    run = json.loads((out / "slvit" / "run.json").read_text())
    net = presets.build("resnet18", exit_type="slvit", num_outputs=10, input_size=32,
                        weights=str(out / "backbone.safetensors"))
    net.load_exits(str(out / "slvit" / "exits.safetensors"))
    policy = policies.MaxSoftmax(json.loads((out / "slvit" / "policy.json").read_text())["thresholds"])
    info = run["data"]
    prep = D.prepare(D.load_images(out / "digits.npz"), 32, info["val_fraction"], info["test_fraction"],
                     info["seed"], info["mean"], info["std"])
    x, y = map(torch.stack, zip(*[prep.data[i] for i in prep.splits["test"]]))
    with torch.no_grad():
        result = net.early_exit(x, policy)
        brute = policies.apply(policy, net(x))
    assert torch.equal(result.exit_index, brute.exit_index)
    torch.testing.assert_close(result.outputs, brute.outputs, rtol=1e-4, atol=1e-4)
    accuracy = float((result.outputs.argmax(1) == y).float().mean())
    assert accuracy == pytest.approx(reports["slvit"]["early_exit"]["accuracy"], abs=1e-6)
    assert result.counts == reports["slvit"]["early_exit"]["exit_counts"]


def test_demo_prints_the_table(demo):
    # the module fixture's printed output is not capturable here; format its reports the same way
    from slvit_fast.workflow.report import format_comparison

    text = format_comparison(demo[1])
    for token in ("SL-ViT", "CNN", "backbone", "layer1", "layer2", "early exit MaxSoftmax", "wall-clock"):
        assert token in text


def test_demo_command_line_repeats_the_numbers(demo, tmp_path):
    """``slvit-fast demo`` in a new process with the fixture's settings: same accuracies, counts and FLOPs
    (fixed seeds, one thread), and the printed summary."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-m", "slvit_fast.cli", "demo", "--out", str(tmp_path / "d"), "--samples", "400",
         "--backbone-epochs", "1", "--exit-epochs", "3"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    for line in ("backbone epoch 1/1", "SL-ViT vs CNN exit", "accuracy vs mean FLOPs",
                 f"plot: {tmp_path / 'd' / 'accuracy_flops.png'}"):
        assert line in result.stdout, line
    for kind, rep in demo[1].items():
        again = json.loads((tmp_path / "d" / kind / "report.json").read_text())
        assert [r["accuracy"] for r in again["exits"]] == [r["accuracy"] for r in rep["exits"]]
        for key in ("accuracy", "exit_counts", "mean_flops"):
            assert again["early_exit"][key] == rep["early_exit"][key], (kind, key)


def test_a_later_demo_never_replaces_the_data_of_a_finished_run(tmp_path):
    """The demo writes its data before run_experiment's checks (which may still fail): with a finished run in
    OUT it must not replace that run's digits.npz by other data (review 10); the same data is not rewritten."""
    import numpy as np

    from slvit_fast.workflow import digits

    out = tmp_path / "out"
    first = digits._demo_data(out, 100, 0)
    assert first == out / "digits.npz"
    (out / "slvit").mkdir()
    (out / "slvit" / "run.json").write_text("{}")  # a finished run trained on it
    stamp = first.stat().st_mtime_ns
    assert digits._demo_data(out, 100, 0) == first and first.stat().st_mtime_ns == stamp  # same data: kept
    other = digits._demo_data(out, 150, 0)
    assert other != first and other.name.startswith("digits-") and other.is_file()
    with np.load(first) as a, np.load(other) as b:
        assert a["y"].shape == (100,) and b["y"].shape == (150,)
    (out / "slvit" / "run.json").unlink()  # no run uses digits.npz any more: replaced in place
    assert digits._demo_data(out, 150, 0) == first
    with np.load(first) as a:
        assert a["y"].shape == (150,)
