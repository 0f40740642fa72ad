"""What a training run shows: a progress bar on terminals only, and one summary line per epoch.

The summary always goes to the ``slvit_fast.training`` logger (INFO), whatever ``progress`` says, so
log files and services get it without tqdm's carriage returns. When ``progress`` is on and the
program has configured no logging at all, the same line is also printed to stdout, so an interactive
run still shows it (once: with logging configured, only the logger shows it).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("slvit_fast.training")


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_bar(total: int | None, desc: str, enabled: bool):
    """A tqdm bar if ``enabled`` and stderr is a terminal; otherwise a disabled one (writes nothing)."""
    return tqdm(total=total, desc=desc, disable=not (enabled and _stderr_is_tty()), leave=False)


def _first_stop(history_epochs: list[dict[str, Any]], i: int) -> int | None:
    for e in history_epochs:
        if e["exits"][i]["stopped"]:
            return e["epoch"]
    return None


def epoch_summary(history, epochs: int, has_val: bool) -> str:
    """``epoch 3/10 (1.2s): exit0 loss 0.81 val 0.90 accuracy 0.75; exit1 stopped at epoch 2``."""
    last = history.epochs[-1]
    parts = []
    for i, r in enumerate(last["exits"]):
        stop = _first_stop(history.epochs, i)
        if r["stopped"] and stop is not None and stop < last["epoch"]:
            parts.append(f"exit{i} stopped at epoch {stop + 1}")
            continue
        text = f"exit{i} loss {r['train_loss']:.4f}"
        if has_val:
            text += f" val {r['val_loss']:.4f} {history.metric_names[i]} {r['val_metric']:.4f}"
        if r["stopped"]:
            text += " (stops: no validation improvement)"
        parts.append(text)
    return f"epoch {last['epoch'] + 1}/{epochs} ({last['seconds']:.1f}s): " + "; ".join(parts)


def report(line: str, progress: bool) -> None:
    log.info("%s", line)
    if progress and not log.hasHandlers():
        print(line, flush=True)

