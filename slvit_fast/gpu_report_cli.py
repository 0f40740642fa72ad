"""``slvit-fast gpu-report``: every kernel we ship, compiled for real GPUs without one, plus a roofline.

Part 1 (from :mod:`slvit_fast.gpu_report` and :func:`slvit_fast.native.gpu_report_rows`): each Triton
kernel configuration the presets use and each CUDA C++ kernel, compiled for sm_80 / sm_90, with
registers, shared memory, spill bytes, tensor-core instruction count (SASS) and theoretical occupancy
(blocks and warps per SM). A half-precision or TF32 kernel with a GEMM stage and no tensor-core
instruction is a failed row; any failed row makes the command exit 1. Part 2 (:mod:`slvit_fast.roofline`): per preset, each fused
kernel's FLOPs, minimum HBM bytes and H100 SXM time bound, next to eager PyTorch's launch count and
HBM traffic for the same exit.
"""

from __future__ import annotations

import json

import torch

from . import gpu_report, native, roofline
from .exit_presets import PRESETS
from .slvit_exit import SLViTExit

ROOFLINE_CASES = ((1, torch.float32), (64, torch.bfloat16))


def roofline_rows(presets: tuple[str, ...] | None = None) -> list[dict]:
    rows = []
    for name in presets or tuple(PRESETS):
        config = SLViTExit.from_preset(name).config
        for batch, dtype in ROOFLINE_CASES:
            rows.append({"preset": name, **roofline.exit_roofline(config, batch, dtype)})
    return rows


def run(archs: tuple[int, ...], dtypes: tuple[str, ...] | None, presets: tuple[str, ...] | None,
        as_json: bool) -> int:
    gpu_report.register_provider("cuda", native.gpu_report_rows)
    kwargs = {"archs": archs, "presets": presets}
    if dtypes:
        kwargs["dtypes"] = dtypes
    rows = gpu_report.report_rows(**kwargs)
    roof = roofline_rows(presets)
    if as_json:
        print(json.dumps({"kernels": rows, "roofline": roof}, indent=1))
    else:
        print(gpu_report.format_table(rows))
        spills = sum(1 for r in rows if r.get("spill_bytes"))
        compiled = sum(1 for r in rows if r.get("registers") is not None)
        failed = [r for r in rows if not r.get("ok")]
        print(f"\n{len(rows)} kernel builds, {compiled} compiled, {spills} with spills, {len(failed)} failed rows")
        for r in failed:
            print(f"FAILED {r['family']} {r['kernel']} {r['dtype']} {r['arch']}: {r.get('error', '')[:300]}")
        print("(tc = tensor-core instructions in the SASS; blk/SM, warps = theoretical occupancy per SM and the "
              "binding limit, slvit_fast.occupancy)\n")
        print("Roofline (H100 SXM: 3.35 TB/s HBM, 67 TFLOP/s fp32, 495 TF32, 989 bf16) - fused exit vs eager:")
        for r in roof:
            print(roofline.format_roofline(r["preset"], r))
    return 0 if all(r.get("ok") for r in rows) else 1
