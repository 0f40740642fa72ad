"""Every benchmark runs once (smoke size), and `slvit-fast bench` writes its table, JSON and plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_each_benchmark_runs_once():
    env = {**os.environ, "SLVIT_BENCH_SMOKE": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable", "-q", "-p",
                             "no:warnings", "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary


@pytest.mark.slow
def test_bench_cli_writes_table_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    # the slow anchors (max-autotune, ONNX export) are covered at a tiny size below
    env = {**os.environ, "SLVIT_BENCH_SKIP_SLOW_ANCHORS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "slvit_fast.cli", "bench", "--presets", "resnet152-b1", "--batches", "1",
         "--train-batches", "", "--backbones", "", "--throughput-backbone", "", "--repeats", "3",
         "--json", str(out_json), "--plot", str(out_png)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vs eager" in result.stdout and "targets:" in result.stdout
    data = json.loads(out_json.read_text())
    (entry,) = data["exits"]
    assert entry["preset"] == "resnet152-b1" and entry["batch"] == 1
    assert set(entry["speedup_vs_eager"]) >= {"eager", "compile"} and entry["speedup_vs_eager"]["eager"] == 1.0
    assert entry["speedup_vs_compile"]["compile"] == 1.0 and data["matmul_gflops"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overhead_benchmark_rows_are_consistent():
    from slvit_fast.bench.e2e_bench import run_overhead

    rows = run_overhead("resnet152", batch=1, input_size=64, repeats=1)
    assert [r.branch for r in rows] == ["b1", "b2"]
    for r in rows:
        assert r.prefix_s > 0 and r.exit_s > 0 and 0 < r.flop_ratio < 1
        assert r.overhead_vs_flops == pytest.approx(r.time_ratio / r.flop_ratio)
        assert r.exit_pages == "4 KiB"
    huge = run_overhead("resnet152", batch=1, input_size=64, repeats=1, huge_pages=True)
    assert [r.flop_ratio for r in huge] == [r.flop_ratio for r in rows]
    assert all(r.exit_pages in ("2 MiB", "4 KiB (no huge pages given)") for r in huge)


def test_end_to_end_targets_name_the_exit_weights_pages():
    from slvit_fast.bench.run import BenchReport, evaluate_targets

    row = dict(backbone="resnet152", branch="b1", module="layer2.0.conv2", batch=1, backend="cpu", prefix_s=1.0,
               exit_s=0.1, time_ratio=0.1, flop_ratio=0.05, overhead_vs_flops=2.0)
    report = BenchReport(machine="m", matmul_gflops=1.0, overhead=[row, {**row, "exit_pages": "2 MiB",
                                                                          "overhead_vs_flops": 1.2}])
    e2e = [t for t in evaluate_targets(report) if t["target"].startswith("end to end")]
    assert [t["measured"] for t in e2e] == [2.0, 1.2] and [t["met"] for t in e2e] == [False, True]
    assert "pages: 2 MiB" in e2e[1]["target"] and "pages" not in e2e[0]["target"]


TINY = dict(in_channels=4, feature_size=(8, 8), patch_size=(2, 2), embed_dim=16, num_heads=2, mlp_dim=32,
            head_hidden=16, num_outputs=5)


def test_anchors_are_columns_of_the_same_interleaved_run():
    """max-autotune and ONNX Runtime join the rounds; every ratio against every anchor exists and is positive."""
    from slvit_fast import SLViTConfig
    from slvit_fast.bench.exit_bench import RATIO_FIELDS, run_exit_bench
    from slvit_fast.bench.run import format_exit_table

    r = run_exit_bench(SLViTConfig(**TINY, extra_tokens=1, extra_dim=6), batch=2, repeats=2,
                       anchors=("max-autotune", "onnxruntime"))
    assert r.anchors_skipped == {}
    impls = set(r.times_s)
    assert impls >= {"eager", "compile", "max-autotune", "onnxruntime"}
    for anchor, field_name in RATIO_FIELDS.items():
        ratios = getattr(r, field_name)
        assert set(ratios) == impls, (anchor, ratios)
        assert ratios[anchor] == 1.0 and all(v > 0 for v in ratios.values())
        # one run: every ratio is a quotient of the same medians
        for name in impls:
            assert ratios[name] == pytest.approx(r.times_s[anchor] / r.times_s[name])
    assert r.setup_s["onnxruntime"] > 0 and r.setup_s["max-autotune"] > 0
    assert r.max_abs_diff_vs_eager["onnxruntime"] < 1e-4  # checked against eager before timing
    table = format_exit_table([r])
    assert "vs max-at" in table and "vs ORT" in table and "onnxruntime" in table


def test_slow_anchors_can_be_skipped_and_training_reports_why(monkeypatch):
    from slvit_fast import SLViTConfig
    from slvit_fast.bench import run as bench_run
    from slvit_fast.bench.exit_bench import build, run_exit_bench

    monkeypatch.setenv("SLVIT_BENCH_SKIP_SLOW_ANCHORS", "1")
    assert bench_run.default_anchors() == ()
    monkeypatch.setenv("SLVIT_BENCH_SKIP_SLOW_ANCHORS", "0")
    assert bench_run.default_anchors() == ("max-autotune", "onnxruntime")

    cfg = SLViTConfig(**TINY)
    b = build(cfg, 2, "train", anchors=("max-autotune", "onnxruntime"))
    assert "max-autotune" not in b.timed and "onnxruntime" not in b.timed
    assert set(b.skipped) == {"max-autotune", "onnxruntime"} and "inference" in b.skipped["onnxruntime"]
    with pytest.raises(ValueError, match="unknown anchor"):
        build(cfg, 1, "inference", anchors=("tensorrt",))

    r = run_exit_bench(cfg, batch=1, repeats=1, include=("eager", "cpu"))
    assert r.speedup_vs_max_autotune == {} and r.speedup_vs_onnxruntime == {}
    table = bench_run.format_exit_table([r])
    assert "vs ORT" not in table and "vs max-at" not in table
    # a target against an absent anchor says why it has no value instead of failing or passing
    report = bench_run.BenchReport(machine="test", matmul_gflops=1.0, exits=[r])
    r.preset, r.batch = bench_run.TARGET_PRESET, 1
    rows = {t["target"]: t for t in bench_run.evaluate_targets(report)}
    ort = rows["batch 1: cpu vs ONNX Runtime"]
    assert ort["met"] is None and ort["why_missing"] == "onnxruntime not requested"


def test_onnxruntime_anchor_reports_a_missing_install(monkeypatch):
    from slvit_fast import SLViTConfig
    from slvit_fast.bench import anchors
    from slvit_fast.bench.exit_bench import build

    real = anchors.importlib.util.find_spec
    monkeypatch.setattr(anchors.importlib.util, "find_spec", lambda n: None if n == "onnxruntime" else real(n))
    b = build(SLViTConfig(**TINY), 1, "inference", include=("eager",), anchors=("onnxruntime",))
    assert "onnxruntime is not installed" in b.skipped["onnxruntime"] and "onnxruntime" not in b.timed


def test_early_exit_target_compares_with_the_flop_prediction():
    from slvit_fast.bench.e2e_bench import ThroughputRow
    from slvit_fast.bench.run import BenchReport, evaluate_targets, format_report

    row = ThroughputRow("resnet152", 64, 0.5, 0.5, 10.0, 16.0, 1.6, 2.0, 0.8)
    report = BenchReport(machine="test", matmul_gflops=1.0)
    report.throughput = [row.to_dict()]
    (target,) = [t for t in evaluate_targets(report) if t["target"].startswith("early-exit")]
    assert target["goal"] == 0.9 and target["measured"] == 0.8 and target["met"] is False
    assert "FLOPs predict 2.00x, measured 80% of it" in format_report(report)
    report.throughput[0]["fraction_of_flop_prediction"] = None
    (target,) = [t for t in evaluate_targets(report) if t["target"].startswith("early-exit")]
    assert target["met"] is None and "FLOP prediction" in target["why_missing"]


def test_early_exit_throughput_on_a_channels_last_backbone():
    """The channels_last row converts the network and its inputs, really exits early, and gets its own
    target row naming the layout; a misspelt layout is refused before any work."""
    from slvit_fast.bench.e2e_bench import run_early_exit_throughput
    from slvit_fast.bench.run import BenchReport, evaluate_targets

    with pytest.raises(ValueError, match="memory_format='nhwc'"):
        run_early_exit_throughput("resnet18", 4, fractions=(0.5,), input_size=64, memory_format="nhwc")
    rows = [run_early_exit_throughput("resnet18", 8, fractions=(0.5,), input_size=64, repeats=1,
                                      memory_format=fmt, fold_batchnorm=fold)[0]
            for fmt, fold in (("contiguous", False), ("channels_last", False), ("channels_last", True))]
    assert [(r.memory_format, r.bn_folded) for r in rows] == [
        ("contiguous", False), ("channels_last", False), ("channels_last", True)]
    for r in rows:
        assert r.early_fraction == 0.5 and r.flop_predicted_speedup > 1.0 and r.early_exit_images_per_s > 0
    # folding changes no FLOP count (BatchNorm is not counted), so the three rows share one prediction
    assert rows[0].flop_predicted_speedup == rows[1].flop_predicted_speedup == rows[2].flop_predicted_speedup
    report = BenchReport(machine="test", matmul_gflops=1.0)
    report.throughput = [r.to_dict() for r in rows]
    labels = [t["target"] for t in evaluate_targets(report) if t["target"].startswith("early-exit")]
    assert len(labels) == 3 and "contiguous)" in labels[0] and "channels_last)" in labels[1]
    assert "channels_last, BatchNorm folded)" in labels[2]
