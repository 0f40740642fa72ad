"""End-to-end benchmarks on whole backbones.

* **Overhead**: for each exit of a backbone preset, the time of the backbone prefix up to the branch
  vs the time of the exit called right after it (as in an early-exit run: pairs of calls), next to the
  FLOP ratio (exit FLOPs / prefix FLOPs, what the paper reports).
  The product's promise is that the time ratio is close to the FLOP ratio (target: <= 1.5x of it).
* **Early-exit throughput**: images/s of ``net.early_exit`` (real per-sample exit with batch
  compaction) vs running the full backbone, at first-exit thresholds giving 25/50/75% early exits.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .. import presets
from ..accounting import summary
from ..huge_pages import place_in_huge_pages
from ..inference_prep import prepare_for_inference
from ..policies import MaxSoftmax
from .timing import _sync, time_interleaved


class _StopForward(Exception):
    pass


def _prefix_runner(net, path: str, inputs: tuple):
    """A callable running the backbone only up to (and including) module ``path``; returns its output."""
    module = dict(net.backbone.named_modules())[path]
    box = {}

    def hook(_m, _a, out):
        box["out"] = out
        raise _StopForward

    def run():
        handle = module.register_forward_hook(hook)
        try:
            net.backbone(*inputs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return box["out"]

    return run


@dataclass
class OverheadRow:
    backbone: str
    branch: str
    module: str
    batch: int
    backend: str
    prefix_s: float
    exit_s: float
    time_ratio: float  # exit time / prefix time
    flop_ratio: float  # exit FLOPs / prefix FLOPs
    overhead_vs_flops: float  # time_ratio / flop_ratio (target <= 1.5)
    exit_pages: str = "4 KiB"  # the exits' parameters in the default pages, or "2 MiB" (place_in_huge_pages)

    def to_dict(self) -> dict:
        return asdict(self)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _time_after_prefix(prefix, exit_call, pairs: int, budget_s: float = 0.5) -> tuple[float, float]:
    """Median seconds of the prefix and of the exit called right after it, over (prefix, exit) pairs.

    Every timed exit call follows a prefix call, as in an early-exit run (interleaved rounds ran the exit
    after itself every other round and several times back to back, so most timed calls were warm: review
    9). At least ``pairs`` pairs, more (up to 40) when the prefix is quick enough for ``budget_s``."""
    _sync()
    t0 = time.perf_counter()
    prefix()
    _sync()
    first = time.perf_counter() - t0
    exit_call()  # (first calls: warm-up, untimed)
    n = max(pairs, min(40, int(budget_s / max(first, 1e-6))))
    ps, es = [], []
    for _ in range(n):
        _sync()
        t0 = time.perf_counter()
        prefix()
        _sync()
        t1 = time.perf_counter()
        exit_call()
        _sync()
        ps.append(t1 - t0)
        es.append(time.perf_counter() - t1)
    return statistics.median(ps), statistics.median(es)


def run_overhead(backbone: str, batch: int, input_size=None, repeats: int = 5, huge_pages: bool = False
                 ) -> list[OverheadRow]:
    """Time of each exit vs the backbone prefix feeding it, next to their FLOP ratio. ``huge_pages``: the
    exits' parameters moved into 2 MiB pages first (place_in_huge_pages; the exit runs cold after its
    prefix, and each 4 KiB page of weight it touches is then a TLB miss)."""
    # built outside inference_mode, as a user's network usually is: parameters made under it are
    # inference tensors, which cannot be moved into huge pages (place_in_huge_pages leaves them)
    net = presets.build(backbone, input_size=input_size).eval()
    with torch.inference_mode():
        return _overhead_rows(net, backbone, batch, repeats, huge_pages)


def _overhead_rows(net, backbone: str, batch: int, repeats: int, huge_pages: bool) -> list[OverheadRow]:
    pages = "4 KiB"
    if huge_pages:
        moved = place_in_huge_pages(net.exits)
        pages = "2 MiB" if moved.huge_bytes > 0 else "4 KiB (no huge pages given)"
    inputs = _as_tuple(presets.example_input(backbone, batch, input_size=net.input_size))
    table = summary(net)
    features = net.branch_features(*inputs)
    rows = []
    for i, path in enumerate(net.exit_paths):
        prefix = _prefix_runner(net, net._triggers[i], inputs)
        exit_call = (lambda i=i, f=features[i]: net.exit_forward(i, f))
        prefix_s, exit_s = _time_after_prefix(prefix, exit_call, repeats)
        r = table.rows[i]
        time_ratio = exit_s / prefix_s
        flop_ratio = r.exit_flops / r.backbone_flops
        module = net.exit_list()[i]
        backend = module.active_backend(features[i][0] if isinstance(features[i], tuple) else features[i]) \
            if hasattr(module, "active_backend") else "torch"
        rows.append(OverheadRow(backbone, table.rows[i].name, path, batch, backend, prefix_s, exit_s, time_ratio,
                                flop_ratio, time_ratio / flop_ratio, pages))
    return rows


@dataclass
class ThroughputRow:
    backbone: str
    batch: int
    target_early_fraction: float
    early_fraction: float
    full_images_per_s: float
    early_exit_images_per_s: float
    speedup: float
    # backbone FLOPs / mean FLOPs per sample of this early-exit run (EarlyExitResult.flops_speedup), and
    # the measured speedup as a fraction of it (issue 14 target: >= 0.9 at 50% leaving at b1); None when
    # the installed multi-exit code does not report FLOP costs
    flop_predicted_speedup: float | None = None
    fraction_of_flop_prediction: float | None = None
    # the backbone's (and its inputs') memory format in this row: "contiguous" (NCHW) or "channels_last"
    memory_format: str = "contiguous"
    # True: BatchNorms of the backbone were folded into its convolutions (slvit_fast.prepare_for_inference;
    # False when asked for but nothing could be folded, e.g. a backbone torch.fx cannot trace)
    bn_folded: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def run_early_exit_throughput(backbone: str = "resnet152", batch: int = 64, fractions=(0.25, 0.5, 0.75),
                              input_size=None, repeats: int = 3, memory_format: str = "contiguous",
                              fold_batchnorm: bool = False) -> list[ThroughputRow]:
    """Images/s of ``early_exit`` vs the full backbone, thresholds set so ``fractions`` leave at exit 0.

    ``memory_format="channels_last"`` converts the network and its image inputs (both timed sides alike).
    On CPU it is the faster layout for convolutions, most of all for the early, memory-bound layers that
    every sample runs before the first exit: their share of the backbone's time sets how much of the
    FLOP-predicted speedup an early exit can realize. ``fold_batchnorm=True`` prepares the network with
    :func:`slvit_fast.prepare_for_inference` (BatchNorms folded into the convolutions, which removes a
    pass over every early feature map), again for both timed sides."""
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    if memory_format not in formats:
        raise ValueError(f"memory_format={memory_format!r}: expected one of {sorted(formats)}")
    fmt = formats[memory_format]
    net = presets.build(backbone, input_size=input_size).eval()  # (outside inference_mode: run_overhead)
    folded = False
    if fold_batchnorm:
        folded = bool(prepare_for_inference(net, memory_format=memory_format).folded)
    else:
        net.to(memory_format=fmt)
    with torch.inference_mode():
        return _throughput_rows(net, backbone, batch, fractions, repeats, memory_format, fmt, folded)


def _throughput_rows(net, backbone, batch, fractions, repeats, memory_format, fmt, folded) -> list[ThroughputRow]:
    inputs = tuple(t.contiguous(memory_format=fmt) if t.dim() == 4 else t
                   for t in _as_tuple(presets.example_input(backbone, batch, input_size=net.input_size)))
    outs = net(*inputs)
    confidence = torch.softmax(outs[0].float(), -1).amax(-1)
    rows = []
    for frac in fractions:
        # exit 0 takes the `frac` most confident samples; later exits take nobody (the final output does)
        threshold = torch.quantile(confidence, 1.0 - frac).item()
        policy = MaxSoftmax([threshold] + [None] * (net.num_exits - 1))
        result = net.early_exit(inputs if len(inputs) > 1 else inputs[0], policy)
        early = float((result.exit_index < net.num_exits).float().mean())
        t = time_interleaved({
            "full": lambda: net.backbone(*inputs),
            "early_exit": lambda: net.early_exit(inputs if len(inputs) > 1 else inputs[0], policy),
        }, repeats=repeats, warmup=1)
        full_ips, ee_ips = batch / t["full"].median_s, batch / t["early_exit"].median_s
        predicted = getattr(result, "flops_speedup", None)
        fraction = ee_ips / full_ips / predicted if predicted else None
        rows.append(ThroughputRow(backbone, batch, frac, early, full_ips, ee_ips, ee_ips / full_ips, predicted,
                                  fraction, memory_format, folded))
    return rows
