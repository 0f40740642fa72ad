"""``slvit-fast train``: train a preset's exits end to end on synthetic data (nothing is downloaded).

The task: 4 classes, the label is the image quadrant that was brightened. Both exit types learn it
from a random-weight frozen backbone, which shows the whole loop (frozen backbone, per-exit losses,
scheduler, early stopping, feature cache, checkpoints) working in minutes on a CPU.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 4


def quadrant_images(n: int, size: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    half = size // 2
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 1.5
    return TensorDataset(x, y)


def run_synthetic_training(backbone: str = "resnet152", exit_type: str = "slvit", samples: int = 256, epochs: int = 5,
                           batch_size: int = 32, input_size: int = 112, cache_dir: str | None = None,
                           checkpoint_dir: str | None = None, lr: float = 1e-3, log=print):
    from .. import presets
    from .loop import train_exits

    if backbone == "audiocsrnet":
        raise SystemExit("slvit-fast train: the synthetic image task needs an image classifier backbone "
                         "(resnet152, densenet201, inception_v3); use train_exits() directly for audiocsrnet")
    # Seeded random weights: the same backbone every run, so a later run can reuse --cache-dir (the cache
    # is keyed by the backbone's weights) and resume from --checkpoint-dir against the same features.
    torch.manual_seed(0)
    net = presets.build(backbone, exit_type=exit_type, num_outputs=NUM_CLASSES, input_size=input_size)
    n_val = max(batch_size, samples // 4)
    train = DataLoader(quadrant_images(samples, input_size, seed=0), batch_size=batch_size, shuffle=cache_dir is None)
    val = DataLoader(quadrant_images(n_val, input_size, seed=1), batch_size=batch_size)
    log(f"training {net.num_exits} {exit_type} exits of {backbone} (random weights, frozen) at {input_size}x{input_size} "
        f"on {samples} synthetic samples, {n_val} for validation"
        + (f"; feature cache in {cache_dir}" if cache_dir else ""))
    t0 = time.perf_counter()
    history = train_exits(net, train, val, epochs=epochs, lr=lr, cache_dir=cache_dir, checkpoint_dir=checkpoint_dir)
    total = time.perf_counter() - t0
    secs = [e["seconds"] for e in history.epochs]
    cache = f" (+ {history.cache_seconds:.1f} s building the feature cache once)" if history.cache_seconds else ""
    log(f"done in {total:.1f} s; epoch times: " + ", ".join(f"{s:.1f}s" for s in secs) + cache)
    for i, name in enumerate(getattr(net, "branch_names", [f"exit{i}" for i in range(net.num_exits)])):
        log(f"  {name}: val accuracy {history.exit_series(i, 'val_metric')[-1]:.1%} (chance {1 / NUM_CLASSES:.0%})")
    return net, history, total
