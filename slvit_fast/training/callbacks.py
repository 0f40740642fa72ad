"""``train_exits(callbacks=[...])``: user hooks called after every epoch and when an exit stops early.

A callback is any object with one or both of ``on_epoch_end(epoch, history)`` and
``on_exit_stopped(exit_index, epoch)``, or a dict with those keys mapping to functions. ``epoch`` is
0-based; ``history`` is the run's :class:`History` (``history.epochs[-1]`` is the epoch just ended).
Callbacks run on every rank, after the epoch's checkpoint is committed, in the order given.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

HOOKS = ("on_epoch_end", "on_exit_stopped")


class Callbacks:
    def __init__(self, callbacks: Iterable[Any] | None, on_epoch_end: Callable | None = None):
        self.hooks: dict[str, list[Callable]] = {h: [] for h in HOOKS}
        items = list(callbacks or [])
        if on_epoch_end is not None:  # the older single-function argument
            items.append({"on_epoch_end": on_epoch_end})
        for k, cb in enumerate(items):
            if isinstance(cb, dict):
                unknown = sorted(set(cb) - set(HOOKS))
                if unknown:
                    raise ValueError(f"callbacks[{k}]: unknown keys {unknown}; a callback dict may have {list(HOOKS)}")
                found = {h: cb[h] for h in HOOKS if cb.get(h) is not None}
            else:
                found = {h: getattr(cb, h) for h in HOOKS if callable(getattr(cb, h, None))}
            if not found:
                raise TypeError(f"callbacks[{k}] ({type(cb).__name__}) has none of {list(HOOKS)}")
            for h, fn in found.items():
                if not callable(fn):
                    raise TypeError(f"callbacks[{k}][{h!r}] is not callable: {fn!r}")
                self.hooks[h].append(fn)

    def epoch_end(self, epoch: int, history) -> None:
        for fn in self.hooks["on_epoch_end"]:
            fn(epoch, history)

    def exit_stopped(self, exit_index: int, epoch: int) -> None:
        for fn in self.hooks["on_exit_stopped"]:
            fn(exit_index, epoch)
