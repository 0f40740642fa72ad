"""The command line and the pure-Python wheel (the compiled wheel is tested with the native backends)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "slvit_fast.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=600)


def test_list_presets_one_liner():
    out = subprocess.run([sys.executable, "-c", "import slvit_fast as sf; print(sf.list_presets())"],
                         capture_output=True, text=True, check=True).stdout
    for name in ("resnet152-b1", "densenet201-b2", "inceptionv3-b1-cifar100", "audiocsrnet-av1"):
        assert name in out


def test_info_lists_backends():
    result = _cli("info")
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "available" in result.stdout


def test_info_names_the_fused_kernels_instruction_set():
    """`info` says which ISA the cpu backend's fused path runs (SLVIT_FAST_CPU_ISA applied as inference
    applies it), and shows a bad value of the switch instead of failing."""
    from slvit_fast.backends import cpu_backend

    if cpu_backend.fused_isa() is None:
        pytest.skip("the fused CPU kernels are not built or not supported on this CPU")
    forced = _cli("info", "--json", env={"SLVIT_FAST_CPU_ISA": "avx2"})
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["cpu_fused_isa"] == "avx2"
    off = _cli("info", "--json", env={"SLVIT_FAST_CPU_FUSED": "0"})
    assert json.loads(off.stdout)["cpu_fused_isa"] is None
    bad = _cli("info", env={"SLVIT_FAST_CPU_ISA": "sse9"})
    assert bad.returncode == 0 and "error:" in bad.stdout and "sse9" in bad.stdout


def test_presets_command():
    result = _cli("presets")
    assert result.returncode == 0 and "audiocsrnet-v1" in result.stdout and "72x128x512" in result.stdout


def test_synthetic_demo_prints_both_resnet152_exits():
    result = _cli("demo", "--synthetic", "--batch-size", "1")
    assert result.returncode == 0, result.stderr
    assert "resnet152-b1" in result.stdout and "resnet152-b2" in result.stdout
    assert "607,374" in result.stdout and "803,982" in result.stdout  # exit parameter counts


@pytest.mark.slow
def test_pure_python_wheel_ships_the_kernels_package(tmp_path):
    env = {**os.environ, "SLVIT_FAST_SKIP_NATIVE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("slvit_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "slvit_fast/kernels/__init__.py" in names and "slvit_fast/reference.py" in names
    assert not any(n.endswith(".so") for n in names)


def test_synthetic_train_runs_on_a_catalogue_backbone(tmp_path):
    """`slvit-fast train` without --data keeps the synthetic example, now for every preset (resnet18 used to
    print a traceback); the per-epoch summary line reaches stdout through the slvit_fast logger."""
    result = _cli("train", "--backbone", "resnet18", "--epochs", "1", "--samples", "32", "--input-size", "32",
                  "--cache-dir", str(tmp_path / "feats"), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "training 2 slvit exits of resnet18" in result.stdout and "epoch 1/1" in result.stdout
    assert any((tmp_path / "feats").iterdir())
