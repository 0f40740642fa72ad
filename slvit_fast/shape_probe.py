"""Shapes without arithmetic: run a module on fake tensors and watch named submodules' outputs.

:func:`feature_shapes` is the public question "which feature maps does my backbone have, and how
big?", answerable before any exit exists; :func:`probe` is the machinery under it.

Every "what shape comes out of ``layer2``?" question in the package - exit configs sized for a
backbone (presets), :meth:`MultiExitNetwork.feature_shapes`, FLOP counting (accounting) - is answered
here: the module runs under ``FakeTensorMode`` (tensors carry shape, dtype and device only, so any
input size costs milliseconds), in eval mode and without autograd, watching the named submodules'
outputs through :mod:`slvit_fast.hook_scope` (so a real forward of the same module in another thread
is not disturbed). Submodules switched to eval for the probe are switched back afterwards.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
from torch import Tensor, nn

from .hook_scope import watching

__all__ = ["feature_shapes", "probe", "input_sizes", "image_sizes", "shape_of", "chain_points", "unknown_path"]


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


def unknown_path(root: nn.Module, path: str, what: str = "module") -> ValueError:
    """The error for a ``path`` that is not a submodule of ``root``, with near matches."""
    names = [n for n, _ in root.named_modules() if n]
    near = difflib.get_close_matches(path, names, n=6, cutoff=0.5)
    if not near:
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        near = [n for n in names if n.startswith(parent + ".") and n.count(".") == path.count(".")][:6]
    hint = f"; did you mean one of {near}?" if near else ""
    top = [n for n in names if "." not in n]
    return ValueError(f"{what} path {path!r} is not a submodule of the backbone ({type(root).__name__}){hint} "
                      f"(top-level children: {top})")


def chain_points(backbone: nn.Module) -> list[str]:
    """The backbone's top-level children and, recursively, the children of every ``nn.Sequential`` among
    them (``layer2``, ``layer2.0``, ``features.transition1.conv``, ...): the points a chain-like
    backbone (torchvision CNNs) passes its whole state through - where exits usually go, and where
    :class:`~slvit_fast.MultiExitNetwork` can drop exited samples without moving the point."""
    out: list[str] = []

    def visit(m: nn.Module, prefix: str) -> None:
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            out.append(path)
            if isinstance(child, nn.Sequential):
                visit(child, path)

    visit(backbone, "")
    return out


def image_sizes(input_size: Any) -> list[tuple[int, ...]]:
    """:func:`input_sizes`, where an int ``n`` or ``(H, W)`` also mean a 3-channel image."""
    if isinstance(input_size, int):
        return [(3, input_size, input_size)]
    if isinstance(input_size, (tuple, list)) and len(input_size) == 2 and all(isinstance(v, int) for v in input_size):
        return [(3, *input_size)]
    return input_sizes(input_size)


def feature_shapes(backbone: nn.Module, input_size: Any,
                   paths: Sequence[str] | None = None) -> dict[str, tuple[int, int, int]]:
    """``{module path: (C, H, W)}`` of the backbone's feature maps for one input of ``input_size``.

    Nothing is computed: the backbone runs on fake tensors (any input size costs milliseconds), so
    use it to size exits (``SLViTConfig.for_feature_map``) before any exit exists.

    Args:
        backbone: any ``nn.Module`` (or a ``MultiExitNetwork``: its backbone).
        input_size: ``(C, H, W)``; an int ``n`` or ``(H, W)`` mean a 3-channel image; a list of sizes for
            a backbone taking several inputs (``backbone(*inputs)``).
        paths: the modules to report, in any order. ``None``: every :func:`chain_points` module whose
            output is one 4-D feature map (top-level children and the insides of ``nn.Sequential``
            containers, e.g. ``layer1`` ... ``layer4`` and each block of a torchvision ResNet).

    The result is ordered as the modules finish in the forward pass (the order of exits along the
    depth). A path that is not a submodule, does not run, or outputs anything but a (B, C, H, W)
    tensor is an error naming it.
    """
    if hasattr(backbone, "exit_paths"):  # a MultiExitNetwork: its backbone
        backbone = backbone.backbone
    modules = dict(backbone.named_modules())
    explicit = paths is not None
    paths = [paths] if isinstance(paths, str) else list(paths if explicit else chain_points(backbone))
    for p in paths:
        if p not in modules or p == "":
            raise unknown_path(backbone, p)
    shapes = probe(backbone, [(1, *s) for s in image_sizes(input_size)], paths, stop_early=explicit)
    out: dict[str, tuple[int, int, int]] = {}
    for p, shape in shapes.items():
        if isinstance(shape, tuple) and len(shape) == 4 and all(isinstance(v, int) for v in shape):
            out[p] = shape[1:]
        elif explicit:
            raise ValueError(f"feature_shapes: {p!r} outputs {shape}, not a (B, C, H, W) feature map")
    if explicit:
        missing = [p for p in paths if p not in shapes]
        if missing:
            raise ValueError(f"feature_shapes: {missing} did not run in the backbone's forward pass")
    return out
