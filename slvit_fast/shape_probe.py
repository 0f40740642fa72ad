"""Shapes without arithmetic: run a module on fake tensors and watch named submodules' outputs.

Every "what shape comes out of ``layer2``?" question in the package - exit configs sized for a
backbone (presets), :meth:`MultiExitNetwork.feature_shapes`, FLOP counting (accounting) - is answered
here: the module runs under ``FakeTensorMode`` (tensors carry shape, dtype and device only, so any
input size costs milliseconds), in eval mode and without autograd, watching the named submodules'
outputs through :mod:`slvit_fast.hook_scope` (so a real forward of the same module in another thread
is not disturbed). Submodules switched to eval for the probe are switched back afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
from torch import Tensor, nn

from .hook_scope import watching

__all__ = ["probe", "input_sizes", "shape_of"]


class _Done(Exception):
    """Raised from a hook once every watched shape is known: the rest of the module is not needed."""


def shape_of(obj: Any) -> Any:
    """``tuple(obj.shape)`` for a tensor; the same structure of shapes for tuples/lists; else the type name."""
    if isinstance(obj, Tensor):
        return tuple(obj.shape)
    if isinstance(obj, (tuple, list)):
        return type(obj)(shape_of(o) for o in obj)
    return type(obj).__name__


def input_sizes(input_size: Any) -> list[tuple[int, ...]]:
    """Per-sample sizes as a list: ``(C, H, W)`` -> ``[(C, H, W)]``; a list of sizes stays a list."""
    if isinstance(input_size, (tuple, list)) and input_size and isinstance(input_size[0], int):
        return [tuple(input_size)]
    return [tuple(s) for s in input_size]


def _device_of(module: nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    if t is None:
        t = next(iter(module.buffers()), None)
    return t.device if t is not None else torch.device("cpu")  # a meta module gets meta inputs


def probe(
    module: nn.Module,
    inputs: Sequence[Any],
    paths: Sequence[str] = (),
    *,
    stop_early: bool = True,
    on_output: Callable[[str, Any], None] | None = None,
    context: ContextManager | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``{path: output shape}`` of the submodules ``paths`` when ``module(*inputs, **kwargs)`` runs on fakes.

    ``inputs`` (and ``kwargs`` values): tensors - only their shape and dtype are used - or full shapes
    (batch included) as tuples of ints, tuples/lists/dicts of those, or anything else (passed as is).
    The path ``""`` is ``module`` itself (its own output). ``stop_early``: stop the
    module once every path has produced its output. ``on_output(path, output)`` sees each watched
    output (fake) as it is produced; ``context`` (e.g. a ``FlopCounterMode``) is entered around the
    call, inside the fake mode. A path that runs twice reports its last output.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    modules = dict(module.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise ValueError(f"probe: {missing} are not submodules of {type(module).__name__}")
    wanted = set(paths)
    shapes: dict[str, Any] = {}

    def hook(path: str):
        def fn(output):
            shapes[path] = shape_of(output)
            if on_output is not None:
                on_output(path, output)
            if stop_early and wanted <= shapes.keys():
                raise _Done
        return fn

    device = _device_of(module)

    def fake(x: Any) -> Any:
        if isinstance(x, Tensor):
            return torch.empty(x.shape, dtype=x.dtype, device=device)
        if isinstance(x, (tuple, torch.Size)) and x and all(isinstance(s, int) for s in x):
            return torch.empty(x, device=device)
        if isinstance(x, (tuple, list)):
            return type(x)(fake(v) for v in x)
        if isinstance(x, dict):
            return {k: fake(v) for k, v in x.items()}
        return x

    # eval mode for the probe (BatchNorm must not update its statistics); only modules that are in
    # training mode are switched and switched back, so a probe of an eval-mode network writes nothing
    training = [m for m in module.modules() if m.training]
    for m in training:
        m.training = False
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), \
                watching({modules[p]: hook(p) for p in wanted}):
            args = tuple(fake(x) for x in inputs)
            kw = {k: fake(v) for k, v in (kwargs or {}).items()}
            with context if context is not None else contextlib.nullcontext():
                module(*args, **kw)
    except _Done:
        pass
    finally:
        for m in training:
            m.training = True
    return shapes
