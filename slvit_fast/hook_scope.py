"""Forward hooks that act only for the call that asked for them (thread- and context-safe).

A hook registered on a shared module fires in *every* forward of that module, from every thread.
Registering hooks per call therefore lets one thread's hooks run inside another thread's forward
(issue #12: exits fed another request's features, "ran more than once", a private stop signal
raised in the wrong thread). Here each watched module carries one hook, :func:`_dispatch`, which
looks up what to do in a ``contextvars`` table that only the current call (thread, or asyncio task)
can see; elsewhere it does nothing.

* :func:`watching` - ``with watching({module: fn}):`` runs ``fn(output)`` when ``module`` finishes
  inside the block, in this context only; ``fn`` may return a replacement output.
* :func:`hold` - keep the hook on ``modules`` for good (``MultiExitNetwork`` does this once, so its
  calls never change hook lists). Other hooks are counted per user and removed with the last one.

A hook already present (a deep copy or unpickled copy of a held module) is kept and reused, so no
module ever carries the hook twice. Work the module hands to other threads (``DataParallel``) does
not see the table: exits must be attached to modules that run in the calling thread.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator, Mapping

from torch import nn

__all__ = ["watching", "hold"]

_ACTIVE: ContextVar[Mapping[nn.Module, Callable[[Any], Any]] | None] = ContextVar("slvit_fast_hooks", default=None)
_LOCK = threading.Lock()
# module -> [handle or None (kept for good), number of users]
_USERS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def _dispatch(module: nn.Module, _args: Any, output: Any) -> Any:
    table = _ACTIVE.get()
    if table is None:
        return None
    fn = table.get(module)
    return None if fn is None else fn(output)


def _acquire(module: nn.Module, forever: bool) -> None:
    with _LOCK:
        entry = _USERS.get(module)
        if entry is None:
            present = any(h is _dispatch for h in module._forward_hooks.values())
            handle = None if present else module.register_forward_hook(_dispatch)
            entry = _USERS[module] = [None if present else handle, 0]
        if forever and entry[0] is not None:
            entry[0] = None  # never removed from now on
        entry[1] += 1


def _release(module: nn.Module) -> None:
    with _LOCK:
        entry = _USERS.get(module)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0 and entry[0] is not None:
            entry[0].remove()
            del _USERS[module]


def hold(modules: Iterable[nn.Module]) -> None:
    """Put the dispatching hook on ``modules`` for good (idempotent)."""
    for m in modules:
        _acquire(m, forever=True)


@contextlib.contextmanager
def watching(table: Mapping[nn.Module, Callable[[Any], Any]]) -> Iterator[None]:
    """Within the block, and in this context only, ``table[module](output)`` runs when ``module`` finishes.

    Nested blocks add up (the inner entry wins for a module both watch)."""
    table = {**(_ACTIVE.get() or {}), **table}
    mine = list(table)
    for m in mine:
        _acquire(m, forever=False)
    token = _ACTIVE.set(table)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        for m in mine:
            _release(m)
