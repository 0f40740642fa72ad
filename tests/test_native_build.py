"""The native build: decision logic (csrc/native_build.py), nvcc resource usage (0 spills), build info."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from slvit_fast import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc")


def _native_build():
    spec = importlib.util.spec_from_file_location("slvit_native_build", os.path.join(ROOT, "csrc", "native_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_skip_env_gives_pure_python(monkeypatch, capsys):
    nb = _native_build()
    monkeypatch.setenv(nb.SKIP_ENV, "1")
    assert nb.native_build_options() == {}
    assert "pure-Python" in capsys.readouterr().err


def test_arch_list_default_and_override(monkeypatch):
    nb = _native_build()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert nb.arch_list() == ["8.0", "9.0"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6 9.0+PTX")
    assert nb.arch_list() == ["8.6", "9.0+PTX"]


def test_extension_selection(monkeypatch):
    nb = _native_build()
    monkeypatch.setenv(nb.SKIP_CUDA_ENV, "1")
    names = [e.name for e in nb._extensions()]
    assert "slvit_fast._C_cpu" in names and "slvit_fast._C_cuda" not in names
    monkeypatch.setenv(nb.SKIP_EMU_ENV, "1")
    assert [e.name for e in nb._extensions()] == ["slvit_fast._C_cpu"]


def test_skip_cpu_keeps_the_others(monkeypatch):
    nb = _native_build()
    monkeypatch.setenv(nb.SKIP_CPU_ENV, "1")
    monkeypatch.setenv(nb.SKIP_CUDA_ENV, "1")
    assert [e.name for e in nb._extensions()] == ["slvit_fast._C_emu"]


def test_build_info_reports_every_extension():
    info = native.build_info()
    assert set(info) == {"cpu", "emu", "cuda"}
    assert info["cpu"]["compiled"] and info["cpu"]["usable_here"], info["cpu"]
    if info["cuda"]["compiled"]:
        assert set(info["cuda"]["archs"]) >= {"sm_80", "sm_90"} or os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not torch.cuda.is_available():
            assert not info["cuda"]["usable_here"] and "no CUDA device" in info["cuda"]["reason"]


def test_parse_res_usage_formats():
    cuobjdump_text = """
Resource usage:
 Common:
  GLOBAL:0
 Function _ZN5slvit17slvit_head_kernelIfEEvNS_8ExitArgsE:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:1112 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    rows = native.parse_res_usage("arch = sm_90\n" + cuobjdump_text)
    assert rows == [dict(rows[0], registers=40, spill_bytes=0, arch="sm_90")]
    ptxas_text = """ptxas info    : Compiling entry function '_Zfoo' for 'sm_80'
ptxas info    : Function properties for _Zfoo
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem
"""
    (row,) = native.parse_res_usage(ptxas_text)
    assert row["arch"] == "sm_80" and row["spill_bytes"] == 8 and row["registers"] == 255


@pytest.fixture(scope="module")
def nvcc_resource_usage():
    if not os.path.exists(NVCC):
        pytest.skip(f"nvcc not found at {NVCC}")
    gencode = []
    for arch in ("80", "90"):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    rows = []
    for src in ("slvit_kernels.cu", "slvit_backward.cu"):
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"slvit_{src}_{os.getpid()}.o")
        cmd = [NVCC, "-std=c++20", "-O3", "--resource-usage", *gencode, "-I", os.path.join(ROOT, "csrc", "cuda"),
               "-c", os.path.join(ROOT, "csrc", "cuda", src), "-o", out]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if os.path.exists(out):
            os.remove(out)
        assert r.returncode == 0, r.stderr[-3000:]
        rows += native.parse_res_usage(r.stdout + r.stderr)
    return rows


def test_nvcc_compiles_for_sm80_and_sm90_without_spills(nvcc_resource_usage):
    rows = nvcc_resource_usage
    kernels = {(r["kernel"].split("(")[0].split("<")[0], r["arch"]) for r in rows}
    for arch in ("sm_80", "sm_90"):
        for k in ("void slvit::slvit_encoder_kernel", "void slvit::slvit_head_kernel",
                  "void slvit::slvit_backward_kernel"):
            assert (k, arch) in kernels, sorted(kernels)
    spilling = [r for r in rows if r.get("spill_bytes", 0) != 0]
    assert not spilling, spilling
    assert all(r.get("registers", 0) <= 255 for r in rows)


def test_built_cuda_extension_resources():
    if not native.build_info()["cuda"]["compiled"]:
        pytest.skip("the CUDA extension is not built here")
    if native.cuobjdump() is None:
        pytest.skip("no cuobjdump")
    rows = native.cuda_kernel_resources()
    assert {r["arch"] for r in rows} >= {"sm_80", "sm_90"}
    assert all(r["spill_bytes"] == 0 for r in rows), rows


def test_cli_info_lists_native_backends():
    r = subprocess.run([sys.executable, "-m", "slvit_fast.cli", "info"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "native extensions" in r.stdout and "_C_cpu" in r.stdout


def test_compiler_present():
    assert shutil.which("c++") or shutil.which("g++")


def test_gpu_report_rows_for_cuda_kernels():
    if not (native.build_info()["cuda"]["compiled"] or os.path.exists(NVCC)):
        pytest.skip("neither the CUDA extension nor nvcc is available")
    rows = native.gpu_report_rows((80, 90))
    kinds = {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    for k in ("encoder", "head", "backward"):
        for dt in ("float32", "float16", "bfloat16"):
            for arch in ("sm_80", "sm_90"):
                assert (k, dt, arch) in kinds
    keys = {"family", "kernel", "config", "dtype", "arch", "registers", "shared_bytes", "local_bytes",
            "stack_bytes", "spill_bytes", "presets", "ok", "error"}
    assert all(keys <= set(r) and r["family"] == "cuda" and r["spill_bytes"] == 0 for r in rows)
