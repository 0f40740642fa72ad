"""Preparing a (multi-exit) network for CPU inference: BatchNorm folded into convolutions, channels_last.

Why this matters for early exits: an exit placed early (resnet152's ``layer2.0``) leaves a memory-bound
prefix that every sample runs. On CPU that prefix takes 25-27% of the backbone's time at NCHW but only
10% of its FLOPs, so the speedup an early exit realizes falls short of what the FLOP accounting
predicts, however cheap the exits are. Two standard inference transformations shrink that prefix:

* **BatchNorm folding.** An eval-mode BatchNorm after a convolution is an affine map per output
  channel, so it can be folded into the convolution's weight and bias. That removes a full read and
  write of every early (large) feature map.
* **channels_last.** oneDNN runs convolutions on NHWC maps without layout conversions.

Both sides of any comparison get faster (the full backbone too), and the outputs equal the original
network's up to float rounding (~1e-6 relative in float32; a sample whose confidence sits exactly at
a threshold may move to a neighbouring exit).

Folding is irreversible and for inference only: the BatchNorm modules are replaced by ``nn.Identity``
(module paths stay valid, so exits and their hooks are unaffected), the backbone's ``state_dict``
loses their buffers, and a :class:`~slvit_fast.MultiExitNetwork` with an unfrozen backbone refuses
``train()`` afterwards. Exit checkpoints (``save_exits``) are unaffected. A convolution/BatchNorm pair
is folded only when the dataflow proves it safe (traced with ``torch.fx``): the convolution's output
feeds that BatchNorm and nothing else, each module is called exactly once, neither carries a hook or
is an exit point, and the BatchNorm has running statistics. Everything else is reported as skipped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .multi_exit import BATCHNORM_FOLDED_ATTR as FOLDED_ATTR, MultiExitNetwork

__all__ = ["prepare_for_inference", "fold_batchnorm", "FoldReport", "FOLDED_ATTR"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_DIM = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` / :func:`prepare_for_inference` did: ``folded`` (conv path, BatchNorm
    path) pairs, ``skipped`` (BatchNorm path, reason) pairs, and the memory format applied (or None)."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    memory_format: str | None = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm(s) into convolutions, skipped {len(self.skipped)}"
                 + (f"; memory format {self.memory_format}" if self.memory_format else "")]
        lines += [f"  skipped {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def _fold_pair(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """conv <- bn(conv(.)) in place. Computed in float64 and cast back, so half-precision weights lose
    nothing to the fold itself."""
    w = conv.weight.detach().double()
    scale = bn.running_var.detach().double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    bias = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
    new_w = (w * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(conv.weight.dtype)
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(new_w.contiguous(memory_format=_format_of(conv.weight)), requires_grad=requires_grad)
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=requires_grad)


def _format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None))


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def fold_batchnorm(model: nn.Module, keep: tuple[str, ...] = ()) -> FoldReport:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it, in place.

    ``model`` is a backbone or a :class:`~slvit_fast.MultiExitNetwork` (its backbone is folded; exit
    points are kept). ``keep``: module paths (relative to the backbone) that must not change. Raises
    ``ValueError`` when the model is in training mode; a model ``torch.fx`` cannot trace is left as it
    is, with a warning and the reason in the report."""
    report = FoldReport()
    backbone = model.backbone if isinstance(model, MultiExitNetwork) else model
    if isinstance(model, MultiExitNetwork):
        keep = tuple(keep) + tuple(model._watched_paths)
    norms = {n: m for n, m in backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not norms:
        return report
    training = [n for n, m in norms.items() if m.training]
    if training:
        raise ValueError(f"fold_batchnorm: BatchNorm {training[0]!r} (and {len(training) - 1} more) is in training "
                         "mode; folding uses the running statistics, so call .eval() first")
    try:
        graph = torch.fx.symbolic_trace(backbone).graph
    except Exception as e:  # noqa: BLE001 - any tracing failure means: we cannot prove a fold safe
        why = f"torch.fx cannot trace the backbone ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        warnings.warn(f"fold_batchnorm: nothing folded: {why}", stacklevel=2)
        report.skipped = [(n, why) for n in norms]
        return report
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    keep_set = set(keep)
    for bn_path, bn in norms.items():
        conv_path, why = _fold_target(backbone, bn_path, bn, calls, keep_set)
        if conv_path is None:
            report.skipped.append((bn_path, why))
            continue
        _fold_pair(backbone.get_submodule(conv_path), bn)
        _set_submodule(backbone, bn_path, nn.Identity())
        report.folded.append((conv_path, bn_path))
    if report.folded:
        setattr(backbone, FOLDED_ATTR, True)
    return report


def _fold_target(backbone: nn.Module, bn_path: str, bn: nn.Module, calls: dict, keep: set,
                 ) -> tuple[str | None, str | None]:
    """``(conv path, None)`` when ``bn`` can be folded into that convolution, else ``(None, reason)``."""
    if bn.running_mean is None or bn.running_var is None:
        return None, "no running statistics (track_running_stats=False)"
    if bn_path in keep or _has_hooks(bn):
        return None, "exit point or hooked module"
    bn_calls = calls.get(bn_path, [])
    if len(bn_calls) != 1:
        return None, f"called {len(bn_calls)} times in one forward"
    src = bn_calls[0].args[0] if bn_calls[0].args else None
    if not isinstance(src, torch.fx.Node) or src.op != "call_module":
        return None, "its input is not a module's output"
    conv_path = src.target
    conv = backbone.get_submodule(conv_path)
    if type(conv) not in _CONVS or not isinstance(bn, _NORM_DIM[type(conv)]):
        return None, f"its input comes from {type(conv).__name__} {conv_path!r}, not a matching convolution"
    if len(calls.get(conv_path, [])) != 1:
        return None, f"convolution {conv_path!r} is called {len(calls.get(conv_path, []))} times"
    if len(src.users) != 1:
        return None, f"the output of {conv_path!r} is also used elsewhere"
    if conv_path in keep or _has_hooks(conv):
        return None, f"convolution {conv_path!r} is an exit point or hooked"
    if conv.weight.shape[0] != bn.num_features:
        return None, f"{conv_path!r} has {conv.weight.shape[0]} output channels, the BatchNorm {bn.num_features}"
    return conv_path, None


def prepare_for_inference(net: nn.Module, *, fold: bool = True, memory_format: str | None = "channels_last",
                          ) -> FoldReport:
    """Make ``net`` (a :class:`~slvit_fast.MultiExitNetwork` or any backbone) faster for CPU inference and
    early exit, in place: BatchNorms folded into their convolutions (:func:`fold_batchnorm`) and the
    whole network converted to ``memory_format`` ("channels_last", "contiguous" or None to leave it).
    Feed inputs in the same format (``x.contiguous(memory_format=torch.channels_last)``); the exits accept
    either. Call after loading weights and ``net.eval()``; irreversible (see the module docstring)."""
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format, None: None}
    if memory_format not in formats:
        raise ValueError(f"memory_format={memory_format!r}: expected 'channels_last', 'contiguous' or None")
    backbone = net.backbone if isinstance(net, MultiExitNetwork) else net
    if backbone.training:
        raise ValueError("prepare_for_inference: the backbone is in training mode; call net.eval() first "
                         "(folding uses BatchNorm running statistics)")
    report = fold_batchnorm(net) if fold else FoldReport()
    if memory_format is not None:
        net.to(memory_format=formats[memory_format])
        report.memory_format = memory_format
    return report
