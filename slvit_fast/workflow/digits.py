"""``slvit-fast demo``: the paper's experiment in miniature, on data that ships with scikit-learn.

scikit-learn's digits (1797 8x8 grayscale images, 10 classes) are upsampled to 3x32x32 and split
70/15/15 with a fixed seed. A torchvision ResNet18 (standard width, random init) is trained on them for
a few epochs; then, exactly as in the paper, the backbone is frozen and SL-ViT exits and the paper's CNN
exits are attached at the same branches (``layer1``: 64x8x8, ``layer2``: 128x4x4; both sized with
``for_feature_map``), trained classifier-wise, calibrated on the validation split (MaxSoftmax
thresholds for a budget of half the backbone's FLOPs), and used for real early exit on the test split.
It prints parameters, FLOPs and test accuracy per exit, the early-exit accuracy vs mean FLOPs, the
measured wall-clock speedup vs the plain backbone, and writes the accuracy-vs-FLOPs PNG.

The pipeline is :func:`slvit_fast.workflow.run_experiment` - the one behind ``slvit-fast train
--data`` - on ``OUT/digits.npz``; ``slvit-fast evaluate --run OUT/slvit --data OUT/digits.npz``
re-evaluates the saved run (a later demo with other ``--samples`` into an OUT holding a finished run
writes ``OUT/digits-<hash>.npz`` instead, and prints the command with that file). Seeds are fixed; on a busy machine the numbers of the wall-clock columns
move, the rest does not.

Threads: one by default. Training is then bit-for-bit repeatable (multi-threaded float reductions
round differently, and 3 epochs of Adam turn 1e-3 weight differences into different test accuracies),
and on a shared 2-core machine one thread was 5-6x faster than two oversubscribed ones. ``threads=2``
(``--threads 2``) is faster on an idle machine; the numbers then differ slightly from the 1-thread run.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .experiment import RunSpec, run_experiment
from .report import fmt_count, format_comparison
from .rundir import PLOT_FILE, PUBLISH_FILE, RUN_FILE, STAGE_PREFIX, being_written

__all__ = ["run_digits_demo", "write_digits"]

DEMO_BACKBONE = "resnet18"


def _digits_arrays(samples: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit(f"the demo needs scikit-learn (pip install 'slvit_fast[data]'): {e}")
    d = load_digits()
    x, y = d.images.astype(np.float32), d.target.astype(np.int64)
    if samples is not None and samples < len(y):
        keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:samples])
        x, y = x[keep], y[keep]
    return x, y


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, x=x, y=y)
    os.replace(tmp, path)  # never a half-written data file
    return path


def write_digits(path: str | os.PathLike, samples: int | None = None, seed: int = 0) -> Path:
    """scikit-learn's digits as ``x`` (N, 8, 8) float32 in [0, 16] and ``y`` (N,) at ``path`` (.npz);
    ``samples``: a seeded random subset of that many."""
    return _save_npz(Path(path), *_digits_arrays(samples, seed))


def _demo_data(out: Path, samples: int | None, seed: int) -> Path:
    """The demo's data file in ``out``: ``digits.npz``, unless that file holds other data (another
    ``--samples`` or seed) that a finished run in ``out`` was trained on - then a file named by its content,
    so a later demo (which may still fail its checks) never replaces the data an earlier run needs
    (review 10). The same data is not rewritten."""
    x, y = _digits_arrays(samples, seed)
    path = out / "digits.npz"
    if path.is_file():
        try:
            with np.load(path) as old:
                if np.array_equal(old["x"], x) and np.array_equal(old["y"], y):
                    return path
        except Exception:  # unreadable: rewrite it
            pass
        # a run that may need this file: finished (a run.json), committed (a publishing record: killed while it
        # was moved in) or running now (the folder's lock held, or a staging folder) - review 11
        if ((out / PUBLISH_FILE).is_file() or being_written(out) or any(out.glob(STAGE_PREFIX + "*"))
                or any((d / RUN_FILE).is_file() for d in (out, *(p for p in out.iterdir() if p.is_dir())))):
            digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:12]
            path = out / f"digits-{digest}.npz"
    return _save_npz(path, x, y)


def _curve_table(reports: dict[str, dict[str, Any]], thresholds=(0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999)) -> list[str]:
    lines = ["accuracy vs mean FLOPs per sample on the test split (MaxSoftmax threshold t at every exit):",
             "  t      " + "  ".join(f"{('SL-ViT' if k == 'slvit' else 'CNN') + ' accuracy':>15} {'mean FLOPs':>10}"
                                      for k in reports)]
    for t in thresholds:
        cells = []
        for rep in reports.values():
            p = next((p for p in rep["curve"] if abs(p["threshold"] - t) < 1e-9), None)
            cells.append(f"{'-':>15} {'-':>10}" if p is None else
                         f"{100 * p['accuracy']:>14.1f}% {fmt_count(p['mean_flops']):>10}")
        lines.append(f"  {t:<6} " + "  ".join(cells))
    final = next(iter(reports.values()))["exits"][-1]
    lines.append(f"  backbone alone: {100 * final['accuracy']:.1f}% at {fmt_count(final['total_flops'])} FLOPs")
    return lines


def _verdict(reports: dict[str, dict[str, Any]]) -> list[str]:
    s, c = reports.get("slvit"), reports.get("cnn")
    if s is None or c is None:
        return []
    lines = []
    for rs, rc in zip(s["exits"][:-1], c["exits"][:-1]):
        better = "higher" if rs["accuracy"] > rc["accuracy"] else ("equal" if rs["accuracy"] == rc["accuracy"] else "lower")
        lines.append(f"  {rs['name']} ({rs['module']}): SL-ViT {100 * rs['accuracy']:.1f}% vs CNN {100 * rc['accuracy']:.1f}% "
                     f"({better}); params {fmt_count(rs['params'])} vs {fmt_count(rc['params'])}, exit FLOPs "
                     f"{fmt_count(rs['exit_flops'])} vs {fmt_count(rc['exit_flops'])}")
    es, ec = s["early_exit"], c["early_exit"]
    lines.append(f"  early exit: SL-ViT {100 * es['accuracy']:.1f}% at {fmt_count(es['mean_flops'])} mean FLOPs vs CNN "
                 f"{100 * ec['accuracy']:.1f}% at {fmt_count(ec['mean_flops'])}")
    return ["SL-ViT vs CNN exit (same branches, same training):"] + lines


def _run(out, seed, input_size, backbone_epochs, exit_epochs, samples, threads, timing_repeats, exit_backend):
    """Write the data, say what runs, run the shared pipeline: ``(reports, out, data file)``."""
    out = Path(out)
    data = _demo_data(out, samples, seed)
    n = int(np.load(data)["y"].shape[0])
    epochs = f"{backbone_epochs} epoch{'s' if backbone_epochs != 1 else ''}"
    print(f"slvit-fast demo: SL-ViT vs CNN early exits on scikit-learn's digits ({n} 8x8 images upsampled to "
          f"3x{input_size}x{input_size}), {DEMO_BACKBONE} trained here for {epochs}; "
          f"{threads} thread{'s' if threads != 1 else ''}; output in {out}", flush=True)
    reports = run_experiment(RunSpec(
        data=str(data), backbone=DEMO_BACKBONE, out=str(out), input_size=input_size, exit_types=("slvit", "cnn"),
        epochs=exit_epochs, train_backbone_epochs=backbone_epochs, batch_size=64, lr=1e-3, seed=seed,
        val_fraction=0.15, test_fraction=0.15, timing_repeats=timing_repeats, exit_backend=exit_backend,
        plot_title=f"{DEMO_BACKBONE} on digits ({input_size} px): early exit, accuracy vs FLOPs",
        extra={"demo": "digits"},
    ))
    return reports, out, data


def run_digits_demo(out: str | os.PathLike = "slvit-fast-demo", seed: int = 0, input_size: int = 32,
                    backbone_epochs: int = 3, exit_epochs: int = 20, samples: int | None = None,
                    threads: int = 1, timing_repeats: int = 3, exit_backend: str = "auto",
                    ) -> dict[str, dict[str, Any]]:
    """Run the demo (module docstring); returns ``{"slvit": report, "cnn": report}`` (``report.json``)."""
    t0 = time.perf_counter()
    threads = int(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        reports, out, data = _run(out, seed, input_size, backbone_epochs, exit_epochs, samples, threads,
                                  timing_repeats, exit_backend)
    finally:
        torch.set_num_threads(before)
    seconds = time.perf_counter() - t0
    print()
    print(format_comparison(reports, f"{DEMO_BACKBONE} on digits, test split ({next(iter(reports.values()))['test_samples']} "
                                     f"samples): params, FLOPs per sample and accuracy per exit"))
    print()
    print("\n".join(_curve_table(reports)))
    print()
    print("\n".join(_verdict(reports)))
    print(f"\nplot: {out / PLOT_FILE} (per exit type: {out / 'slvit' / PLOT_FILE}, {out / 'cnn' / PLOT_FILE})")
    print(f"re-evaluate: slvit-fast evaluate --run {out / 'slvit'} --data {data}")
    print(f"demo finished in {seconds:.0f} s ({threads} thread{'s' if threads != 1 else ''}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)
    for kind, rep in reports.items():
        rep["demo_seconds"] = seconds
    return reports
