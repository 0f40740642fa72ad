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
    result = subprocess.run(
        [sys.executable, "-m", "slvit_fast.cli", "bench", "--presets", "resnet152-b1", "--batches", "1",
         "--train-batches", "", "--backbones", "", "--throughput-backbone", "", "--repeats", "3",
         "--json", str(out_json), "--plot", str(out_png)],
        cwd=REPO, capture_output=True, text=True, timeout=1800)
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
