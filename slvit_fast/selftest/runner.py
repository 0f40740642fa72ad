"""``run_selftest``: correctness of every backend x preset x dtype, launches, timing; the report.

Phases (wall time of each is reported):

1. correctness - for each distinct preset configuration, one float64 reference and one reference per
   dtype, then every backend in every dtype it supports: output and every gradient, paired tolerances;
   the first forward+backward of each backend is timed apart (on CUDA it includes Triton's JIT compile);
2. launches - CUDA: one inference forward per backend, configuration and dtype under the torch profiler;
   CPU: the launches the emulated/interpreted GPU kernels record during the correctness forward;
3. timing - inference at batch 1 and 64 of every timed backend vs eager and the torch.compile anchors.
   CPU: preset resnet152-b1 in fp32 only (the fast backends; emulator/interpreter are not timed), anchors
   ``compile`` and ``max-autotune`` (``--quick``: ``compile`` only). CUDA: anchors ``compile``,
   ``reduce-overhead`` (CUDA graphs) and ``max-autotune`` on resnet152-b1 in fp32 and bf16 (``--quick``:
   bf16, no max-autotune); without ``--quick`` every other preset is also timed vs eager (no anchors).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import SLViTConfig
from ..slvit_exit import SLViTExit
from .correctness import CaseResult, check_config, matmul_precision, randomize_
from .launches import forward_launches
from .plan import (CORRECTNESS_BATCH, VEHICLE_BATCH, VEHICLE_MAX_CHANNELS, BackendPlan, cap_channels, plan_backends,
                   preset_config, preset_configs, triton_interpreted)
from .report import Row, SelftestReport
from .timing import TimingCase, time_case
from .tolerance import DTYPES

TIMING_PRESET = "resnet152-b1"
TIMING_BATCHES = (1, 64)


def timing_plan(device: str, quick: bool, presets: list[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(preset, dtype, anchors) cases to time, in order."""
    anchor_preset = TIMING_PRESET if TIMING_PRESET in presets else presets[0]
    if device == "cuda":
        dtypes = ("bf16",) if quick else ("fp32", "bf16")
        anchors = ("compile", "reduce-overhead") if quick else ("compile", "reduce-overhead", "max-autotune")
        cases = [(anchor_preset, dt, anchors) for dt in dtypes]
        if not quick:
            cases += [(p, dt, ()) for p in presets if p != anchor_preset for dt in dtypes]
        return cases
    return [(anchor_preset, "fp32", ("compile",) if quick else ("compile", "max-autotune"))]


def environment(device: str) -> dict[str, Any]:
    from .. import __version__

    env = {"slvit_fast": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": torch.get_num_threads(),
           "triton_interpret": triton_interpreted()}
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cuda"] = torch.version.cuda
    return env


def _rows_for(results: list[CaseResult], presets: dict[str, tuple[SLViTConfig, str | None]], key: str,
              launches: dict[tuple[str, str], tuple[int | None, str]], in_channels: int) -> list[Row]:
    rows = []
    for preset, (_, same) in presets.items():
        if (same or preset) != key:
            continue
        for r in results:
            n, note = launches.get((r.backend, r.dtype), (r.launches, r.launches_note))
            rows.append(Row(r.backend, preset, r.dtype, r.batch, r.ok, same, r.error, r.max_errors(),
                            [c.to_dict() for c in r.checks], n, note, r.first_call_s, in_channels=in_channels))
    return rows


def _count_launches(config: SLViTConfig, plans: list[BackendPlan], device: str) -> dict[tuple[str, str], tuple]:
    """(backend, dtype) -> (CUDA kernels of one inference forward, how counted), by the torch profiler."""
    out = {}
    base = randomize_(SLViTExit(config, backend="torch"), 0).eval()
    x = torch.randn(1, config.in_channels, *config.feature_size)
    extra = torch.randn(1, config.extra_tokens, config.extra_dim) if config.extra_tokens else None
    for b in plans:
        for dt in b.dtypes if b.skipped is None else ():
            dtype, precision = DTYPES[dt]
            m = base.to(device=device, dtype=dtype)
            m.backend = b.name
            try:
                with matmul_precision(precision):
                    out[(b.name, dt)] = forward_launches(
                        m, x.to(device=device, dtype=dtype), None if extra is None else extra.to(device=device, dtype=dtype))
            except Exception as e:  # the correctness phase already reports a crashing backend
                out[(b.name, dt)] = (None, f"count failed: {type(e).__name__}: {str(e)[:200]}")
    return out


def run_selftest(device: str = "cpu", quick: bool = False, json_path: str | None = None,
                 backends: list[str] | None = None, presets: list[str] | None = None,
                 configs: dict[str, SLViTConfig] | None = None, timing: bool = True,
                 batch: int | None = None, log: Callable[[str], None] = print) -> SelftestReport:
    """Run the self-test and return its report (``.verdict()``, ``.to_dict()``, ``.exit_code``).

    ``configs`` replaces the paper presets with named configurations (tests use tiny ones); ``timing``
    False skips the timing phase.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch.cuda.is_available() is False (no GPU or a CPU-only torch build)")
    t_start = time.perf_counter()
    plans = plan_backends(device, backends)
    report = SelftestReport(device, quick, environment(device), plans)
    if device == "cpu":
        if triton_interpreted():
            report.notes.append("triton runs under the Triton interpreter (TRITON_INTERPRET=1 was set before import): "
                                "kernel logic checked, not compiled code; not timed")
        else:
            report.notes.append("triton is not checked on CPU unless TRITON_INTERPRET=1 is set before slvit_fast "
                                "is imported (the Triton interpreter); it runs compiled on --device cuda")
    if configs is not None:
        preset_map = {}
        seen: dict[SLViTConfig, str] = {}
        for name, cfg in configs.items():
            preset_map[name] = (cfg, seen.get(cfg))
            seen.setdefault(cfg, name)
    else:
        preset_map = preset_configs(quick, presets)
        if quick:
            report.notes.append("--quick: feature maps capped at 16 channels (token/head geometry unchanged)")
    batch = batch or (1 if quick else CORRECTNESS_BATCH)
    backend_dtypes = {b.name: b.dtypes for b in plans if b.skipped is None}
    if not backend_dtypes:
        report.notes.append("no backend can run on this device")

    # 1+2. correctness and launches, once per distinct configuration; emulated/interpreted backends
    # (correctness vehicles on the host) on the channel-capped configuration at batch 1 unless --quick
    # already made everything small.
    t0 = time.perf_counter()
    t_launch = 0.0
    groups = [([b for b in plans if b.skipped is None and (quick or configs is not None or not b.vehicle)], None, batch),
              ([b for b in plans if b.skipped is None and b.vehicle and not quick and configs is None],
               VEHICLE_MAX_CHANNELS, VEHICLE_BATCH)]
    if groups[1][0]:
        report.notes.append(f"{', '.join(b.name for b in groups[1][0])}: presets with <= {VEHICLE_MAX_CHANNELS} "
                            f"channels at batch {VEHICLE_BATCH} (host emulation speed); compiled backends at full "
                            f"size, batch {batch}")
    unique = [(name, cfg) for name, (cfg, same) in preset_map.items() if same is None]
    for k, (name, cfg) in enumerate(unique, 1):
        tc = time.perf_counter()
        n_checks = bad = 0
        for group, max_channels, group_batch in groups:
            if not group:
                continue
            gcfg = cfg if max_channels is None else cap_channels(cfg, max_channels)
            results = check_config(gcfg, group_batch, {b.name: b.dtypes for b in group}, device)
            tl = time.perf_counter()
            launches = _count_launches(gcfg, group, device) if device == "cuda" else {}
            t_launch += time.perf_counter() - tl
            report.rows += _rows_for(results, preset_map, name, launches, gcfg.in_channels)
            n_checks += len(results)
            bad += sum(not r.ok for r in results)
        log(f"[selftest] {k}/{len(unique)} {name}: {n_checks} backend x dtype checks, "
            f"{'all ok' if not bad else f'{bad} FAILED'} ({time.perf_counter() - tc:.1f} s)")
    report.seconds["correctness"] = time.perf_counter() - t0 - t_launch
    if device == "cuda":
        report.seconds["launches"] = t_launch
    first = {}
    for r in report.rows:
        if r.same_config_as is None:
            first[r.backend] = first.get(r.backend, 0.0) + r.first_call_s
    if device == "cuda" and "triton" in first:  # Triton compiles each kernel configuration on its first call
        report.seconds["triton_first_calls"] = first["triton"]

    # 3. timing
    if timing:
        t0 = time.perf_counter()
        timed = [b.name for b in plans if b.skipped is None and b.timed]
        distinct = [name for name, (_, same) in preset_map.items() if same is None]
        for preset, dt, anchors in timing_plan(device, quick, distinct):
            # timing always uses the paper's sizes (--quick shrinks only the correctness configs)
            cfg = preset_map[preset][0] if configs is not None else preset_config(preset, quick=False)
            names = [b for b in timed if dt in backend_dtypes[b]]
            if "torch" not in names:
                names.insert(0, "torch")  # eager is the baseline of every ratio
            for bsz in TIMING_BATCHES:
                log(f"[selftest] timing {preset} {dt} batch {bsz}: {', '.join(names + list(anchors))}")
                case = time_case(preset, cfg, dt, bsz, names, list(anchors), device)
                report.timing.append(case)
                _attach_timing(report.rows, case)
        report.seconds["timing"] = time.perf_counter() - t0
        vehicles = {b.name for b in plans if b.skipped is None and not b.timed}
        for r in report.rows:
            if r.timing is None:
                r.timing_note = ("emulator/interpreter: correctness only" if r.backend in vehicles else
                                 "not in this device's timing plan (preset x dtype)")
        busy = _busy_note()
        if busy:
            report.notes.append(busy)
        untimed = [b.name for b in plans if b.skipped is None and not b.timed]
        if untimed:
            report.notes.append(f"not timed: {', '.join(untimed)} (emulator/interpreter: correctness only)")
        if device == "cpu":
            report.notes.append("timing on CPU: resnet152-b1 fp32 only, anchors compile"
                                + ("" if quick else " + max-autotune") + " (reduce-overhead = CUDA graphs: CUDA only); "
                                "`slvit-fast bench` measures more")
    if not timing:
        for r in report.rows:
            r.timing_note = "timing skipped (--no-timing)"
    report.seconds["total"] = time.perf_counter() - t_start
    if json_path:
        Path(json_path).write_text(json.dumps(_finite(report.to_dict()), indent=1))
        log(f"[selftest] wrote {json_path}")
    return report


def _busy_note() -> str:
    """A warning when other processes compete for the cores while timing (a shared machine)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    cores = os.cpu_count() or 1
    if load <= cores:
        return ""
    return (f"machine busy while timing (load average {load:.1f} on {cores} cores): absolute times are inflated "
            "and multi-threaded paths suffer most; rerun on a quiet machine for figures")


def _attach_timing(rows: list[Row], case: TimingCase) -> None:
    for r in rows:
        if case.preset not in (r.preset, r.same_config_as) or r.dtype != case.dtype:
            continue
        impl = "eager" if r.backend == "torch" else r.backend
        if impl not in case.seconds:
            continue
        entry = {"exit_s": case.seconds[impl]}
        for vs in case.seconds:
            if vs != impl and (vs == "eager" or vs in ("compile", "reduce-overhead", "max-autotune")):
                entry[f"{vs}_s"] = case.seconds[vs]
                entry[f"speedup_vs_{vs}"] = case.speedup(impl, vs)
        r.timing = {**(r.timing or {}), str(case.batch): entry}


def _finite(obj):
    """JSON without Infinity/NaN (strict parsers reject them): non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
