"""`slvit-fast gpu-report`: Triton and CUDA C++ kernels compiled for sm_80/sm_90, plus the roofline."""

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_gpu_report_lists_triton_and_cuda_kernels_without_spills():
    if shutil.which("nvcc", path="/usr/local/cuda/bin") is None:
        pytest.skip("nvcc not found at /usr/local/cuda/bin")
    result = subprocess.run([sys.executable, "-m", "slvit_fast.cli", "gpu-report", "--json", "--presets",
                             "resnet152-b1", "--dtypes", "bfloat16"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    families = {(r["family"], r["arch"]) for r in data["kernels"]}
    assert {("triton", "sm_80"), ("triton", "sm_90"), ("cuda", "sm_80"), ("cuda", "sm_90")} <= families
    assert all(r["ok"] and r["spill_bytes"] == 0 for r in data["kernels"]), [
        (r["family"], r["kernel"], r["arch"], r["spill_bytes"]) for r in data["kernels"] if r["spill_bytes"]]
    # bf16 kernels with GEMM stages run them on tensor cores; occupancy is filled for every row
    assert all(r["tensor_core_required"] and r["tensor_core_instructions"] > 0 for r in data["kernels"]), [
        (r["family"], r["kernel"], r["arch"]) for r in data["kernels"] if not r["tensor_core_instructions"]]
    assert all(r["blocks_per_sm"] >= 1 and 0 < r["occupancy"] <= 1 and r["occupancy_limiter"] for r in data["kernels"])
    (b1, b64) = data["roofline"]
    assert b1["fused_launches"] == 3 and b1["eager_launches"] > b1["fused_launches"]
    assert b64["fused_bytes"] < b64["eager_bytes"]
