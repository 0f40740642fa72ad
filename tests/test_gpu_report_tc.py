"""gpu-report's tensor-core check and occupancy columns: the SASS counter on known cubins, the failing-row
rule, the CLI exit code, and the CUDA C++ launch geometry mirrored from csrc/cuda."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap

import pytest

from slvit_fast import gpu_report, gpu_report_cli, native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")

SASS_SNIPPET = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

	code for sm_80
		Function : _Z3mmav
	.headerflags	@"EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                                  /* 0x00000a0000017a02 */
        /*0010*/                   HMMA.16816.F32.BF16 R12, R16.reuse, R58, R12 ;           /* 0x0000003a100c723c */
        /*0020*/              @!P0 HMMA.1688.F32.TF32 R8, R16, R2, R8 ;                    /* 0x000000021008723c */
        /*0030*/                   HFMA2.MMA R4, -RZ, RZ, 0, 2.384185791015625e-07 ;       /* 0x00000004ff047435 */
        /*0040*/                   IMMA.16832.S8.S8 R4, R8, R12, R4 ;                      /* 0x0000000c08047237 */
        /*0050*/                   EXIT ;                                                  /* 0x000000000000794d */
		..........
		Function : _Z3fmav
        /*0000*/                   FFMA R4, R2, R3, R4 ;                                   /* 0x0000000302047223 */
        /*0010*/                   HFMA2.MMA R2, -RZ, RZ, 0, 0 ;                           /* 0x00000000ff027435 */
arch = sm_90
		Function : _Z3mmav
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;          /* 0x00000000181879f0 */
"""


def test_sass_parser_counts_tensor_core_opcodes_only():
    rows = {(r["mangled"], r["arch"]): r for r in native.parse_sass_tensor_core(SASS_SNIPPET)}
    assert set(rows) == {("_Z3mmav", "sm_80"), ("_Z3fmav", "sm_80"), ("_Z3mmav", "sm_90")}
    mma = rows[("_Z3mmav", "sm_80")]
    # HMMA x2 (one predicated) + IMMA; HFMA2.MMA is an FMA on the MMA pipe, not a tensor-core op
    assert mma["tensor_core_instructions"] == 3 and mma["tensor_core_ops"] == {"HMMA": 2, "IMMA": 1}
    assert mma["instructions"] == 6
    assert rows[("_Z3fmav", "sm_80")]["tensor_core_instructions"] == 0
    assert rows[("_Z3mmav", "sm_90")]["tensor_core_ops"] == {"HGMMA": 1}


TINY_KERNELS = r"""
#include <cstdint>
// One m16n8k16 bf16 tensor-core MMA per thread (fragments are whatever is in memory: only the SASS matters).
__global__ void with_mma(const uint32_t* a, const uint32_t* b, float* c) {
  uint32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], b0 = b[0], b1 = b[1];
  float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  c[threadIdx.x * 4 + 0] = d0; c[threadIdx.x * 4 + 1] = d1; c[threadIdx.x * 4 + 2] = d2; c[threadIdx.x * 4 + 3] = d3;
}
// The same arithmetic shape on the FMA units.
__global__ void without_mma(const float* a, const float* b, float* c) {
  float acc = 0.f;
  for (int k = 0; k < 16; ++k) acc += a[threadIdx.x * 16 + k] * b[k];
  c[threadIdx.x] = acc;
}
"""


@pytest.mark.skipif(not os.path.exists(NVCC), reason=f"nvcc not found at {NVCC}")
@pytest.mark.skipif(native.cuobjdump() is None, reason="no cuobjdump")
def test_sass_counter_on_tiny_cubin(tmp_path):
    src = tmp_path / "tiny.cu"
    src.write_text(TINY_KERNELS)
    cubin = tmp_path / "tiny.cubin"
    subprocess.run([NVCC, "-cubin", "-arch=sm_80", "-O3", str(src), "-o", str(cubin)], check=True,
                   capture_output=True, timeout=300)
    rows = {r["kernel"]: r for r in native.sass_tensor_core_counts(str(cubin))}
    with_mma = next(r for k, r in rows.items() if k.startswith("with_mma"))
    without = next(r for k, r in rows.items() if k.startswith("without_mma"))
    assert with_mma["arch"] == "sm_80"
    assert with_mma["tensor_core_ops"] == {"HMMA": with_mma["tensor_core_instructions"]}
    assert with_mma["tensor_core_instructions"] >= 1
    assert without["tensor_core_instructions"] == 0 and without["instructions"] > 0


def _row(dtype="bfloat16", tc=0, family="triton", **kw):
    row = dict(family=family, kernel="attention_fwd_kernel", config="BLOCK=64", dtype=dtype, arch="sm_80",
               registers=128, shared_bytes=8192, local_bytes=0, stack_bytes=0, spill_bytes=0, presets=["p"],
               ok=True, error="", threads_per_block=256, tensor_core_instructions=tc, matmul_stage=True)
    row.update(kw)
    return row


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32-tf32"])
def test_half_or_tf32_gemm_kernel_without_tensor_cores_fails(dtype):
    row = gpu_report.annotate(_row(dtype, tc=0))
    assert row["ok"] is False and row["tensor_core_required"] is True
    assert "0 tensor-core instructions" in row["error"] and dtype in row["error"]
    assert "FAILED" in gpu_report.format_table([row])
    # the same kernel with tensor-core instructions passes; an unknown count cannot pass
    assert gpu_report.annotate(_row(dtype, tc=84))["ok"] is True
    unknown = gpu_report.annotate(_row(dtype, tc=None))
    assert unknown["ok"] is False and "not inspected" in unknown["error"]


@pytest.mark.parametrize("dtype", ["float32", "float32-ieee"])
def test_exact_fp32_rows_are_exempt(dtype):
    row = gpu_report.annotate(_row(dtype, tc=0))
    assert row["ok"] is True and row["tensor_core_required"] is False


def test_kernel_without_matmul_stage_is_exempt_and_provider_can_require():
    assert gpu_report.annotate(_row("bfloat16", tc=0, matmul_stage=False))["ok"] is True
    # the CUDA C++ float32 kernel is also the TF32 kernel: its provider requires tensor cores explicitly
    row = gpu_report.annotate(_row("float32", tc=0, family="cuda", tensor_core_required=True))
    assert row["ok"] is False


def test_annotate_adds_occupancy():
    # 256 threads x 128 regs: 4096 regs/warp -> 4 warps per sub-partition = 16 warps = 2 blocks
    row = gpu_report.annotate(_row(tc=84))
    assert (row["blocks_per_sm"], row["warps_per_sm"], row["occupancy_limiter"]) == (2, 16, "registers")
    assert row["occupancy"] == pytest.approx(0.25)
    line = gpu_report.format_table([row]).splitlines()[1]
    assert re.search(r"\s84\s+2\s+16\s+regs\s+yes", line), line


def test_cli_exits_nonzero_on_a_failed_row(monkeypatch, capsys):
    rows = [gpu_report.annotate(_row("bfloat16", tc=84)), gpu_report.annotate(_row("float16", tc=0))]
    monkeypatch.setattr(gpu_report, "_PROVIDERS", {})  # run() registers the CUDA provider: keep it local
    monkeypatch.setattr(gpu_report, "report_rows", lambda **kw: rows)
    assert gpu_report_cli.run((80,), None, ("resnet152-b1",), as_json=False) == 1
    out = capsys.readouterr().out
    assert "1 failed rows" in out and "FAILED triton attention_fwd_kernel float16 sm_80" in out
    monkeypatch.setattr(gpu_report, "report_rows", lambda **kw: rows[:1])
    assert gpu_report_cli.run((80,), None, ("resnet152-b1",), as_json=False) == 0


def _read(rel):
    path = os.path.join(ROOT, rel)
    if not os.path.exists(path):
        pytest.skip(f"{rel} not in this tree")
    with open(path) as f:
        return f.read()


def test_cuda_launch_geometry_matches_sources():
    """native.CUDA_THREADS / CUDA_HEAD_ROWS / cuda_dynamic_smem mirror csrc/cuda: fail when they drift."""
    header, kernels = _read("csrc/cuda/slvit_kernels.cuh"), _read("csrc/cuda/slvit_kernels.cu")
    assert int(re.search(r"constexpr int kThreads = (\d+);", header).group(1)) == native.CUDA_THREADS
    assert int(re.search(r"constexpr int kHeadRows = (\d+);", kernels).group(1)) == native.CUDA_HEAD_ROWS
    flat = re.sub(r"\s+", " ", kernels)
    assert "encoder_smem(const ExitArgs& a) { return sizeof(float) * (kThreads / 32) * a.T; }" in flat
    assert "head_smem(const ExitArgs& a, int rows) { return sizeof(float) * rows * a.Hh; }" in flat
    assert "tensor_cores<S>(a) && sizeof(float) * kHeadRows * a.Hh <= 48 * 1024 ? kHeadRows : 1" in flat
    assert re.search(r"SLVIT_LAUNCH\(slvit_backward_kernel<float>, [^;]*dim3\(kThreads\), 0,",
                     _read("csrc/cuda/slvit_backward.cu"))


def test_cuda_dynamic_smem_values():
    from slvit_fast import SLViTConfig
    from slvit_fast.exit_presets import get_preset

    c = SLViTConfig(**get_preset("resnet152-b1").slvit_kwargs())
    assert native.cuda_dynamic_smem("encoder", c, True) == 4 * 8 * c.num_tokens
    assert native.cuda_dynamic_smem("head", c, True) == 4 * 16 * c.head_hidden
    assert native.cuda_dynamic_smem("head", c, False) == 4 * c.head_hidden
    assert native.cuda_dynamic_smem("backward", c, True) == 0
    with pytest.raises(ValueError, match="'tail'"):
        native.cuda_dynamic_smem("tail", c, True)


@pytest.mark.skipif(native.cuobjdump() is None, reason="no cuobjdump")
def test_cuda_rows_carry_tensor_cores_and_occupancy():
    """The CUDA C++ rows (built extension, else nvcc): every kernel x dtype x arch has a SASS count and
    an occupancy; half-precision rows need tensor cores (a row with none is reported as failed)."""
    if not (native.build_info_cuda_compiled() or os.path.exists(NVCC)):
        pytest.skip("neither the CUDA extension nor nvcc")
    rows = [gpu_report.annotate(r) for r in native.gpu_report_rows((80, 90))]
    assert {(r["kernel"], r["dtype"]) for r in rows} >= {(k, d) for k in ("encoder", "head", "backward")
                                                        for d in ("float32", "float16", "bfloat16")}
    for r in rows:
        assert isinstance(r["tensor_core_instructions"], int), r
        assert r["threads_per_block"] == native.CUDA_THREADS and 1 <= r["blocks_per_sm"] <= 8, r
        assert r["tensor_core_required"] is True
        assert r["ok"] == (r["tensor_core_instructions"] > 0), r


def test_ptxas_resource_lines_without_shared_memory():
    """nvcc --resource-usage prints "N bytes smem" only for kernels with static shared memory: registers
    must still be read (0 registers would make the occupancy meaningless)."""
    text = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_Z1fv' for 'sm_80'
        ptxas info    : Function properties for _Z1fv
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 32 registers, used 0 barriers, 376 bytes cmem[0]
        ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'
        ptxas info    : Function properties for _Z1gv
            8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
        ptxas info    : Used 14 registers, used 1 barriers, 4096 bytes smem, 376 bytes cmem[0]
        """)
    rows = {r["mangled"]: r for r in native.parse_res_usage(text)}
    assert (rows["_Z1fv"]["arch"], rows["_Z1fv"]["registers"], rows["_Z1fv"]["shared_bytes"]) == ("sm_80", 32, 0)
    assert (rows["_Z1gv"]["registers"], rows["_Z1gv"]["shared_bytes"], rows["_Z1gv"]["spill_bytes"]) == (14, 4096, 8)
