"""Test-split evaluation of a trained multi-exit network: accuracy, FLOPs, real early exit, wall-clock.

``evaluate(net, policy, test_loader)`` returns the ``report.json`` dictionary:

* ``exits``: per early exit (then ``final``, the plain backbone's own output) the module, feature
  shape, parameters, exit FLOPs, total FLOPs of a sample answered there (backbone up to the exit + all
  exits so far; for ``final`` the plain backbone's FLOPs) and test accuracy;
* ``early_exit``: ``net.early_exit`` (real batch compaction) with the policy over the test split -
  accuracy, exit fractions, mean FLOPs per sample, FLOP speedup vs the plain backbone, and whether it
  equals the brute-force answer (every exit on every sample, then :func:`slvit_fast.policies.apply`);
* ``wall_clock``: measured seconds per sample of the plain backbone (``net.backbone(x)``) and of
  ``net.early_exit(x, policy)`` over the same test batches (best of ``repeats`` interleaved rounds), and
  their ratio;
* ``curve``: accuracy vs mean FLOPs of MaxSoftmax over a threshold sweep (the budgeted-batch curve).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from .. import accounting, analysis, policies
from ..calibration import collect_outputs
from ..inference_prep import prepare_for_inference

__all__ = ["evaluate", "exit_rows"]


def exit_rows(net: Any, input_size: Any, accuracies: Sequence[float]) -> tuple[list[dict], Any]:
    """Per-exit rows (then the plain backbone) and the accounting summary."""
    summary = accounting.summary(net, input_size)
    rows = []
    for r, acc in zip(summary.rows[:-1], accuracies):
        rows.append({"name": r.name, "module": r.module, "features": list(r.feature_shape[1:]), "params": r.params,
                     "exit_flops": r.exit_flops, "total_flops": r.cumulative_flops, "cost_flops": r.cost_flops,
                     "accuracy": acc})
    rows.append({"name": "final", "module": "(backbone output)", "features": None, "params": summary.backbone_params,
                 "exit_flops": 0, "total_flops": summary.backbone_flops, "cost_flops": summary.rows[-1].cost_flops,
                 "accuracy": accuracies[-1]})
    return rows, summary


def _batches(loader) -> list[torch.Tensor]:
    return [b[0] for b in loader]


def _time_pair(fn_a, fn_b, batches: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """Best total seconds of ``fn_a`` and of ``fn_b`` over every batch, in ``repeats`` interleaved rounds
    (after one warm-up round each): on a shared machine a busy moment then hits both, not one."""
    best = [float("inf"), float("inf")]
    with torch.no_grad():
        for r in range(repeats + 1):
            for k, fn in enumerate((fn_a, fn_b)):
                t0 = time.perf_counter()
                for x in batches:
                    fn(x)
                if r:  # round 0 warms up (allocator, kernel selection, lazy imports)
                    best[k] = min(best[k], time.perf_counter() - t0)
    return best[0], best[1]


def evaluate(net: Any, policy: policies.Policy, test_loader, *, input_size: Any = None, timing_repeats: int = 3,
             curve_thresholds: Sequence[float] | None = None, prepare_inference: bool = False) -> dict[str, Any]:
    """The ``report.json`` dictionary for ``net`` + ``policy`` on ``test_loader`` (module docstring).

    ``prepare_inference=True`` first runs :func:`slvit_fast.prepare_for_inference` on ``net`` (in place:
    BatchNorms folded, channels_last, exits' weights in 2 MiB pages), so every figure, accuracy and wall-clock alike, is of the network
    as it would be deployed on CPU; ``report["prepared"]`` records what it did."""
    net.eval()
    prepared = None
    if prepare_inference:
        fold = prepare_for_inference(net)
        hp = fold.huge_pages
        prepared = {"batchnorms_folded": len(fold.folded), "batchnorms_kept": [p for p, _ in fold.skipped],
                    "memory_format": fold.memory_format,
                    "exit_weights_huge_page_bytes": None if hp is None else hp.huge_bytes}
    input_size = input_size if input_size is not None else net.input_size
    outputs, labels, _ = collect_outputs(net, test_loader, "evaluate")
    accuracies = analysis.per_exit_accuracy(outputs, labels)
    rows, summary = exit_rows(net, input_size, accuracies)
    costs = [r.cost_flops for r in summary.rows]
    brute = policies.apply(policy, outputs, exit_costs=costs, backbone_flops=summary.backbone_flops)

    batches = _batches(test_loader)
    if prepared and prepared["memory_format"] == "channels_last":  # inputs in the network's layout, as deployed
        batches = [b.contiguous(memory_format=torch.channels_last) if b.dim() == 4 else b for b in batches]
    got_out, got_idx = [], []
    with torch.no_grad():
        for x in batches:
            res = net.early_exit(x, policy)
            got_out.append(res.outputs)
            got_idx.append(res.exit_index)
    out, idx = torch.cat(got_out), torch.cat(got_idx)
    matches = bool(torch.equal(idx, brute.exit_index)
                   and torch.allclose(out, brute.outputs.to(out.dtype), rtol=1e-4, atol=1e-4))
    n = int(labels.shape[0])
    counts = torch.bincount(idx, minlength=net.num_exits + 1).tolist()
    mean_flops = float(torch.tensor(costs, dtype=torch.float64)[idx].mean())
    early = {
        "policy": repr(policy),
        "accuracy": float((out.argmax(dim=1) == labels).float().mean()),
        "exit_counts": counts,
        "exit_fractions": [c / n for c in counts],
        "mean_flops": mean_flops,
        "backbone_flops": float(summary.backbone_flops),
        "flops_speedup": float(summary.backbone_flops) / mean_flops,
        "matches_brute_force": matches,
    }
    t_backbone, t_early = _time_pair(net.backbone, lambda x: net.early_exit(x, policy), batches, timing_repeats)
    wall = {"batch_size": int(batches[0].shape[0]), "repeats": timing_repeats, "threads": torch.get_num_threads(),
            "backbone_ms_per_sample": 1e3 * t_backbone / n, "early_exit_ms_per_sample": 1e3 * t_early / n,
            "speedup": t_backbone / t_early}
    if curve_thresholds is None:  # 0, 0.05, ..., 1 plus the confident end, where early exit pays on easy data
        curve_thresholds = sorted({i / 20 for i in range(21)} | {0.99, 0.999})
    curve = analysis.accuracy_flops_curve(outputs, labels, costs, thresholds=curve_thresholds)
    return {
        "prepared": prepared,
        "test_samples": n,
        "input_size": list(input_size),
        "exits": rows,
        "early_exit": early,
        "wall_clock": wall,
        "curve": [{"threshold": p.threshold, "accuracy": p.accuracy, "mean_flops": p.flops,
                   "exit_fractions": p.exit_fractions} for p in curve],
    }
