"""``slvit-fast demo --synthetic``: the mechanics of per-sample early exit on a random-weight ResNet152
with the paper's SL-ViT exits (``slvit-fast demo`` without the flag runs the real experiment on digits,
:mod:`slvit_fast.workflow.digits`).

1. builds the ``resnet152`` preset (exits at ``layer2.0.conv2`` and ``layer2``, Table II) and prints the
   paper-style accounting table (parameters, FLOPs, cumulative FLOPs, speedup);
2. picks max-softmax thresholds on a calibration batch so that about a quarter of the samples leave at
   each early exit (cheaply: the calibration run stops after the last exit);
3. runs ``early_exit`` on a synthetic batch - after each exit the backbone continues only on the samples
   still running - and prints how many samples left at each exit, how many rows each stage processed,
   the FLOPs spent, and that the answer equals the brute-force one (every exit on every sample).

Nothing is downloaded: random weights and random-noise images, so this shows the mechanics, not accuracy.
"""

from __future__ import annotations

import time
import warnings

import torch

# torchvision module whose output feeds each paper branch of ResNet152 (Keras counting, Table II):
# the 12th convolution is the strided 3x3 conv of the first layer2 block (28x28x128); the 36th is the
# last conv of layer2, whose block output (28x28x512) is layer2's output.
RESNET152_BRANCHES = {"resnet152-b1": "layer2.0.conv2", "resnet152-b2": "layer2"}


def _calibrate(net, x, fractions):
    """Max-softmax thresholds putting ``fractions[i]`` of ``x`` out at exit i (stops after the last exit)."""
    from . import policies

    seen: dict[int, torch.Tensor] = {}

    def record(i, y, prev):
        seen[i] = torch.softmax(y, dim=1).amax(dim=1)
        return i == net.num_exits - 1  # everyone leaves at the last exit: the deep layers never run

    net.early_exit(x, policies.RegressionCriterion(record))
    thresholds, left = [], torch.ones(x.shape[0], dtype=torch.bool)
    for i, frac in enumerate(fractions):
        conf = seen[i][left]
        k = max(1, round(frac * x.shape[0]))
        if k >= conf.numel():
            thresholds.append(0.0)
            break
        top = conf.sort(descending=True).values
        t = float((top[k - 1] + top[k]) / 2)  # between the k-th and (k+1)-th most confident
        thresholds.append(t)
        idx = left.nonzero().squeeze(1)
        left[idx[seen[i][left] >= t]] = False
    thresholds += [None] * (net.num_exits - len(thresholds))
    return thresholds


def run_demo(batch_size: int = 4, num_outputs: int = 10, seed: int = 0, input_size: int = 224) -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"the demo needs torchvision (pip install 'slvit_fast[vision]'): {e}")
    from . import accounting, policies, presets

    warnings.filterwarnings("ignore", message="slvit_fast: backend 'auto'")
    batch_size = max(1, int(batch_size))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    net = presets.build("resnet152", exit_type="slvit", num_outputs=num_outputs, input_size=input_size)
    print(f"ResNet152 preset (random weights) with SL-ViT exits, input 3x{input_size}x{input_size}, "
          f"built in {time.perf_counter() - t0:.1f} s")
    for name, path, exit_module in zip(net.branch_names, net.exit_paths, net.exits.values()):
        c = exit_module.config
        n_params = sum(p.numel() for p in exit_module.parameters())
        probe = torch.empty(1, c.in_channels, *c.feature_size)
        print(f"  exit resnet152-{name} at {path:<15} features {c.in_channels}x{c.feature_size[0]}x{c.feature_size[1]}"
              f"; {n_params:,} parameters; grid {c.grid[0]}x{c.grid[1]}, d={c.embed_dim}, h={c.num_heads}; "
              f"backend {exit_module.active_backend(probe)!r}")
    summary = accounting.summary(net)
    print(summary.table())
    print()

    frac = 1 / (net.num_exits + 2)  # ~1/4 leave at each early exit, ~1/2 run to the end
    calib = torch.randn(max(12, 3 * batch_size), 3, input_size, input_size, generator=gen)
    thresholds = _calibrate(net, calib, [frac] * net.num_exits)
    thresholds = [None if t is None else round(t, 4) for t in thresholds]
    policy = policies.MaxSoftmax(thresholds)
    print(f"policy {policy!r} (max-softmax thresholds picked on a calibration batch of {calib.shape[0]} "
          f"so that ~{frac:.0%} leave at each early exit)")

    x = torch.randn(batch_size, 3, input_size, input_size, generator=gen)
    t0 = time.perf_counter()
    result = net.early_exit(x, policy)
    t_early = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = net(x)  # brute force: every exit on every sample
    t_full = time.perf_counter() - t0
    reference = policies.apply(policy, outs)
    same = (torch.equal(result.exit_index, reference.exit_index)
            and torch.allclose(result.outputs, reference.outputs, rtol=1e-4, atol=1e-4))

    names = list(net.branch_names) + ["final"]
    paths = list(net.exit_paths) + ["(backbone output)"]
    print(f"\nearly_exit on a batch of {batch_size}:")
    print(f"  {'exit':<6} {'module':<18} {'ran on':>6} {'exited':>6} {'left':>5}")
    for name, path, ran, count, left in zip(names, paths, result.evaluated, result.counts, result.remaining):
        print(f"  {name:<6} {path:<18} {ran:>6} {count:>6} {left:>5}")
    costs = [r.cost_flops for r in summary.rows]
    spent = sum(costs[i] for i in result.exit_index.tolist())
    full = summary.rows[-1].cumulative_flops * batch_size
    print(f"  exit index per sample (input order): {result.exit_index.tolist()}")
    print(f"  FLOPs spent {spent / 1e9:.2f}G vs {full / 1e9:.2f}G running every exit on every sample "
          f"({full / spent:.2f}x fewer); time {t_early:.2f} s vs {t_full:.2f} s")
    print(f"  equals the brute-force answer (every exit on every sample, then the policy): {same}")
    if not same:
        raise SystemExit("early_exit differs from the brute-force answer")
