"""Preparing a (multi-exit) network for CPU inference: BatchNorm folded into convolutions, channels_last.

Why this matters for early exits: an exit placed early (resnet152's ``layer2.0``) leaves a memory-bound
prefix that every sample runs. On CPU that prefix takes 25-27% of the backbone's time at NCHW but only
10% of its FLOPs, so the speedup an early exit realizes falls short of what the FLOP accounting
predicts, however cheap the exits are. Two standard inference transformations shrink that prefix:

* **BatchNorm folding.** An eval-mode BatchNorm after a convolution is an affine map per output
  channel, so it can be folded into the convolution's weight and bias. That removes a full read and
  write of every early (large) feature map.
* **channels_last.** oneDNN runs convolutions on NHWC maps without layout conversions.

And for the exits' own batch-1 latency, their parameters go into 2 MiB pages
(:func:`~slvit_fast.huge_pages.place_in_huge_pages`): an exit runs right after the prefix has evicted
its weights' address translations, and with 4 KiB pages every page of weight is a TLB miss.

Both sides of any comparison get faster (the full backbone too), and the outputs equal the original
network's up to float rounding (~1e-6 relative in float32; a sample whose confidence sits exactly at
a threshold may move to a neighbouring exit).

Folding is irreversible and for inference only: the BatchNorm modules are replaced by ``nn.Identity``
(module paths stay valid, so exits and their hooks are unaffected), the backbone's ``state_dict``
loses their buffers, and a :class:`~slvit_fast.MultiExitNetwork` with an unfrozen backbone refuses
``train()`` afterwards. Exit checkpoints (``save_exits``) are unaffected. A convolution/BatchNorm pair
is folded only when the dataflow proves it safe (traced with ``torch.fx``): the convolution's output
feeds that BatchNorm and nothing else, each module is called exactly once and registered under one
name in the whole network (exits included), no code reads its weights or statistics directly, neither
carries a hook, an instance-patched ``forward`` or is an exit point, no global module hook exists, and
the BatchNorm has running statistics. Everything else is reported as skipped. What fx cannot see (a
``forward`` whose Python branches behave differently on fx proxies, modules shared with another
model) is covered by ``example_inputs=``: the outputs are compared before and after and the fold is
undone on a mismatch. Nothing is changed unless every step succeeds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .huge_pages import HugePageReport, place_in_huge_pages
from .multi_exit import BATCHNORM_FOLDED_ATTR as FOLDED_ATTR, MultiExitNetwork

__all__ = ["prepare_for_inference", "fold_batchnorm", "FoldReport", "FOLDED_ATTR", "place_in_huge_pages",
           "HugePageReport"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_DIM = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format, None: None}


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` / :func:`prepare_for_inference` did: ``folded`` (conv path, BatchNorm
    path) pairs, ``skipped`` (BatchNorm path, reason) pairs, the memory format applied (or None),
    with ``example_inputs`` the largest relative output difference the fold made, and what moving the
    exits' parameters into 2 MiB pages did (None when not asked or the network has no exits)."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    memory_format: str | None = None
    checked_rel_diff: float | None = None
    huge_pages: HugePageReport | None = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm(s) into convolutions, skipped {len(self.skipped)}"
                 + (f"; memory format {self.memory_format}" if self.memory_format else "")
                 + (f"; outputs checked (max rel diff {self.checked_rel_diff:.1e})"
                    if self.checked_rel_diff is not None else "")]
        lines += [f"  skipped {path}: {why}" for path, why in self.skipped]
        if self.huge_pages is not None:
            lines.append(f"exits: {self.huge_pages}")
        return "\n".join(lines)


def _folded_params(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[nn.Parameter, nn.Parameter]:
    """(weight, bias) of conv followed by bn. Computed in float64 and cast back, so half-precision weights
    lose nothing to the fold itself; outside inference mode, so the result can be used with autograd."""
    with torch.no_grad(), torch.inference_mode(False):
        w = conv.weight.detach().double()
        scale = bn.running_var.detach().double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double()
        shift = -bn.running_mean.detach().double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach().double()
        bias = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
        new_w = (w * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(conv.weight.dtype)
        new_w = new_w.contiguous(memory_format=_format_of(conv.weight))
        requires_grad = conv.weight.requires_grad
        return (nn.Parameter(new_w, requires_grad=requires_grad),
                nn.Parameter(bias.to(conv.weight.dtype), requires_grad=requires_grad))


def _format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None))


def _global_hooks() -> bool:
    from torch.nn.modules import module as M

    return any(bool(getattr(M, name, None)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _rel_diff(before, after) -> float:
    a, b = _tensors(before), _tensors(after)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        scale = float(x.abs().max()) if x.numel() else 0.0
        if x.numel() and not torch.equal(torch.isnan(x), torch.isnan(y)):
            return float("inf")
        diff = float((x - y).nan_to_num(0.0).abs().max()) if x.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _normalize_keep(keep, backbone: nn.Module) -> tuple[str, ...]:
    keep = (keep,) if isinstance(keep, str) else tuple(keep)
    names = dict(backbone.named_modules(remove_duplicate=False))
    unknown = [k for k in keep if k not in names]
    if unknown:
        raise ValueError(f"fold_batchnorm: keep={unknown[0]!r} is not a module path of the backbone")
    return keep


def fold_batchnorm(model: nn.Module, keep: str | tuple[str, ...] = (), example_inputs=None,
                   rtol: float | None = None) -> FoldReport:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it, in place.

    ``model`` is a backbone or a :class:`~slvit_fast.MultiExitNetwork` (its backbone is folded; exit
    points and modules shared with exits are kept). ``keep``: module paths (relative to the backbone)
    that must not change. ``example_inputs`` (a tensor or a tuple of positional inputs): ``model`` is
    run on them before and after, and if any output moved by more than ``rtol`` (relative to its
    largest magnitude; default 1e-4, 1e-2 for half-precision models) the fold is undone and a
    ``RuntimeError`` raised. Raises ``ValueError`` when a BatchNorm is in training mode; a model
    ``torch.fx`` cannot trace is left as it is, with a warning and the reason in the report."""
    report = FoldReport()
    backbone = model.backbone if isinstance(model, MultiExitNetwork) else model
    keep = _normalize_keep(keep, backbone)
    if isinstance(model, MultiExitNetwork):
        keep = keep + tuple(model._watched_paths)
    norms = {n: m for n, m in backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not norms:
        return report
    training = [n for n, m in norms.items() if m.training]
    if training:
        raise ValueError(f"fold_batchnorm: the BatchNorm at path {training[0]!r} (and {len(training) - 1} more) "
                         "is in training mode; folding uses the running statistics, so call .eval() first")
    if _global_hooks():
        why = "a global module hook is registered (torch.nn.modules.module.register_module_forward_hook)"
        warnings.warn(f"fold_batchnorm: nothing folded: {why}", stacklevel=2)
        report.skipped = [(n, why) for n in norms]
        return report
    tracer = _RecordingTracer()
    try:
        graph = tracer.trace(backbone)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: we cannot prove a fold safe
        why = f"torch.fx cannot trace the backbone ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        warnings.warn(f"fold_batchnorm: nothing folded: {why}", stacklevel=2)
        report.skipped = [(n, why) for n in norms]
        return report
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    # every name of every module in the whole model (exits too): a module with two names is one object
    # seen from two places, and folding it for one of them changes the other
    names: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        names[id(m)] = names.get(id(m), 0) + 1
    facts = _GraphFacts(calls, tracer.tensors_read, names, set(keep))

    before = _run(model, example_inputs) if example_inputs is not None else None
    undo: list = []
    try:
        for bn_path, bn in norms.items():
            conv_path, why = _fold_target(backbone, bn_path, bn, facts)
            if conv_path is None:
                report.skipped.append((bn_path, why))
                continue
            conv = backbone.get_submodule(conv_path)
            weight, bias = _folded_params(conv, bn)
            parent_path, _, name = bn_path.rpartition(".")
            parent = backbone.get_submodule(parent_path) if parent_path else backbone
            undo.append((conv, conv.weight, conv.bias, parent, name, bn))
            conv.weight, conv.bias = weight, bias
            setattr(parent, name, nn.Identity())
            report.folded.append((conv_path, bn_path))
        if before is not None and report.folded:
            tol = rtol if rtol is not None else (1e-2 if _is_half(backbone) else 1e-4)
            report.checked_rel_diff = _rel_diff(before, _run(model, example_inputs))
            if not report.checked_rel_diff <= tol:
                raise RuntimeError(
                    f"fold_batchnorm: the folded model's outputs differ from the original's by "
                    f"{report.checked_rel_diff:.3g} (relative, > rtol={tol}) on example_inputs: something the "
                    "dataflow check cannot see depends on a folded module; the fold was undone")
    except BaseException:
        for conv, weight, bias, parent, name, bn in reversed(undo):
            conv.weight = weight
            if bias is None:
                conv.register_parameter("bias", None)
            else:
                conv.bias = bias
            setattr(parent, name, bn)
        raise
    if report.folded:
        setattr(backbone, FOLDED_ATTR, True)
    return report


def _is_half(m: nn.Module) -> bool:
    return any(p.dtype in (torch.float16, torch.bfloat16) for p in m.parameters())


def _run(model: nn.Module, example_inputs):
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad():
        return model(*inputs)


class _RecordingTracer(torch.fx.Tracer):
    """fx tracer that also records every parameter or buffer the forward code reads as an attribute
    (``self.conv.weight``, ``self.bn.running_var``): such a read outside the module's own call sees the
    fold (buffers are even baked into the graph as constants, so the graph alone does not show them)."""

    def __init__(self):
        super().__init__()
        self.tensors_read: set[int] = set()

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if isinstance(attr_val, torch.Tensor):
            self.tensors_read.add(id(attr_val))
        return super().getattr(attr, attr_val, parameter_proxy_cache)


@dataclass
class _GraphFacts:
    calls: dict          # module path -> call_module nodes of the traced backbone
    tensors_read: set    # ids of parameters/buffers the forward code reads directly (not via a module call)
    names: dict          # id(module) -> number of names it has in the whole model
    keep: set            # exit points and user-kept paths


def _tensors_read_directly(m: nn.Module, f: _GraphFacts) -> bool:
    return any(id(t) in f.tensors_read for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))


def _fold_target(backbone: nn.Module, bn_path: str, bn: nn.Module, f: _GraphFacts,
                 ) -> tuple[str | None, str | None]:
    """``(conv path, None)`` when ``bn`` can be folded into that convolution, else ``(None, reason)``."""
    if bn.running_mean is None or bn.running_var is None:
        return None, "no running statistics (track_running_stats=False)"
    if bn_path in f.keep or _has_hooks(bn):
        return None, "exit point or hooked module"
    if "forward" in vars(bn):
        return None, "its forward is patched on the instance"
    if f.names.get(id(bn), 0) > 1:
        return None, "registered under several names (one module object reachable from two places)"
    if _tensors_read_directly(bn, f):
        return None, "its parameters or statistics are also read directly by the forward code"
    bn_calls = f.calls.get(bn_path, [])
    if len(bn_calls) != 1:
        return None, f"called {len(bn_calls)} times in one forward"
    src = bn_calls[0].args[0] if bn_calls[0].args else None
    if not isinstance(src, torch.fx.Node) or src.op != "call_module":
        return None, "its input is not a module's output"
    conv_path = src.target
    conv = backbone.get_submodule(conv_path)
    if type(conv) not in _CONVS or not isinstance(bn, _NORM_DIM[type(conv)]):
        return None, f"its input comes from {type(conv).__name__} {conv_path!r}, not a matching convolution"
    if len(f.calls.get(conv_path, [])) != 1:
        return None, f"convolution {conv_path!r} is called {len(f.calls.get(conv_path, []))} times"
    if len(src.users) != 1:
        return None, f"the output of {conv_path!r} is also used elsewhere"
    if conv_path in f.keep or _has_hooks(conv):
        return None, f"convolution {conv_path!r} is an exit point or hooked"
    if "forward" in vars(conv):
        return None, f"convolution {conv_path!r} has a forward patched on the instance"
    if f.names.get(id(conv), 0) > 1:
        return None, f"convolution {conv_path!r} is registered under several names (shared module)"
    if _tensors_read_directly(conv, f):
        return None, f"the weights of {conv_path!r} are also read directly by the forward code"
    if conv.weight.shape[0] != bn.num_features:
        return None, f"{conv_path!r} has {conv.weight.shape[0]} output channels, the BatchNorm {bn.num_features}"
    return conv_path, None


def _to_memory_format(net: nn.Module, memory_format: str) -> None:
    """Like ``net.to(memory_format=...)`` but per rank: channels_last for 4-D tensors, channels_last_3d for
    5-D ones (``Module.to`` refuses a network with Conv3d weights), contiguous for the rest."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        if memory_format == "contiguous":
            return t.contiguous()
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        return t

    with torch.no_grad(), torch.inference_mode(False):  # new copies must stay usable with autograd
        net._apply(convert)


def prepare_for_inference(net: nn.Module, *, fold: bool = True, memory_format: str | None = "channels_last",
                          example_inputs=None, huge_pages: bool = True) -> FoldReport:
    """Make ``net`` (a :class:`~slvit_fast.MultiExitNetwork` or any backbone) faster for CPU inference and
    early exit, in place: BatchNorms folded into their convolutions (:func:`fold_batchnorm`, which also
    takes ``example_inputs`` to check the outputs) and the whole network converted to ``memory_format``
    ("channels_last", "contiguous" or None to leave it). Feed inputs in the same format
    (``x.contiguous(memory_format=torch.channels_last)``); the exits accept either. ``huge_pages``: the
    exits' parameters (of a MultiExitNetwork) into one mapping of 2 MiB pages, last, after every other
    step has settled their tensors. Call after loading weights and ``net.eval()``; irreversible (see the
    module docstring)."""
    if memory_format not in _FORMATS:
        raise ValueError(f"memory_format={memory_format!r}: expected 'channels_last', 'contiguous' or None")
    report = fold_batchnorm(net, example_inputs=example_inputs) if fold else FoldReport()
    if memory_format is not None:
        _to_memory_format(net, memory_format)
        report.memory_format = memory_format
    if huge_pages and isinstance(net, MultiExitNetwork) and len(net.exits):
        report.huge_pages = place_in_huge_pages(net.exits)
    return report
