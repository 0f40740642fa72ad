"""Parameters and FLOPs of a multi-exit network, as in the SL-ViT paper's tables.

Conventions (FLOPs = 2 x multiply-accumulates):

* **Backbone**: ``torch.utils.flop_counter.FlopCounterMode`` under ``FakeTensorMode`` (shapes only, no
  arithmetic, any input size in milliseconds), which counts the matrix products: convolutions,
  ``mm``/``addmm``/``bmm`` (linear layers, attention). Element-wise ops, BatchNorm, pooling and
  activations are not counted. This is the convention of torchvision's published figures: it gives
  11.51 / 4.29 / 5.71 GMACs for resnet152 (224), densenet201 (224), inception_v3 (299) -
  ``tests/test_accounting.py`` checks all three within 1%.
* **Exits**: :class:`~slvit_fast.SLViTExit` and :class:`~slvit_fast.CNNExit` are counted from their
  config by the same rule (every matrix product of the reference implementation: patch embedding,
  Q/K/V, both attention matmuls ``QK^T`` and ``PV``, output projection, encoder MLP, head; the CNN
  exit's FiLM projections, conv and head), because a fused kernel backend is opaque to the flop
  counter; the test checks these formulas against ``FlopCounterMode`` on the torch backend. Other exit
  modules are counted with ``FlopCounterMode``.

Per exit i: ``exit_flops``; ``backbone_flops`` up to the exit point; ``cumulative_flops`` =
backbone up to the exit + exits 0..i (what a sample exiting at i costs; with a single exit this is the
paper's "Total FLOPS"); ``speedup`` = backbone FLOPs / cumulative FLOPs; ``cost_flops`` = the same with
the backbone counted up to the exit's batch-compaction point (what ``early_exit`` really spends on a
sample leaving there). All figures are per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from .shape_probe import input_sizes, probe

__all__ = ["summary", "Summary", "ExitRow", "count_flops", "exit_flops", "slvit_flops", "cnn_exit_flops"]


@dataclass
class ExitRow:
    name: str
    module: str
    feature_shape: tuple
    params: int
    exit_flops: int
    backbone_flops: int
    cumulative_flops: int
    cost_flops: int
    speedup: float


@dataclass
class Summary:
    rows: list[ExitRow]  # one per early exit, then the final output
    backbone_flops: int
    backbone_params: int
    input_size: Any = None
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        def fmt(n: float) -> str:
            for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
                if abs(n) >= div:
                    return f"{n / div:.2f}{unit}"
            return f"{n:.0f}"

        head = ["exit", "module", "features", "params", "exit FLOPs", "total FLOPs", "speedup"]
        body = []
        for r in self.rows:
            feat = "x".join(str(s) for s in r.feature_shape[1:]) if r.feature_shape else "-"
            body.append([r.name, r.module, feat, fmt(r.params), fmt(r.exit_flops), fmt(r.cumulative_flops),
                         f"{r.speedup:.2f}x"])
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
        line = "  ".join("-" * w for w in widths)
        out = []
        if self.title:
            out.append(self.title)
        out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        out.append(line)
        for b in body:
            out.append("  ".join(v.rjust(w) if i >= 3 else v.ljust(w) for i, (v, w) in enumerate(zip(b, widths))))
        out.append(line)
        out.append(f"backbone: {fmt(self.backbone_params)} params, {fmt(self.backbone_flops)} FLOPs "
                   f"({self.backbone_flops / 2e9:.2f} GMACs) per sample; FLOPs = 2 x MACs")
        out.extend(self.notes)
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def count_flops(module: nn.Module, input_size: Any, hooks: Sequence[str] = ()) -> tuple[int, dict[str, int]]:
    """FLOPs of ``module`` for one sample of ``input_size`` ((C, H, W) or a list of per-input sizes),
    and the running count when each module path in ``hooks`` finished."""
    total, at, _ = _count(module, input_size, hooks)
    return total, at


def _count(module: nn.Module, input_size: Any, hooks: Sequence[str]) -> tuple[int, dict[str, int], dict[str, Any]]:
    """One fake run: total FLOPs, the running count when each hooked module finished, and its output shape."""
    from torch.utils.flop_counter import FlopCounterMode

    at: dict[str, int] = {}
    counter = FlopCounterMode(display=False)
    shapes = probe(module, [(1, *s) for s in input_sizes(input_size)], sorted(set(hooks)), stop_early=False,
                   on_output=lambda p, _o: at.__setitem__(p, counter.get_total_flops()), context=counter)
    return int(counter.get_total_flops()), at, shapes


def slvit_flops(config: Any) -> int:
    """FLOPs (2 x MACs) of one SL-ViT exit forward per sample, from its config (``config.flops()``)."""
    return config.flops()


def cnn_exit_flops(config: Any) -> int:
    """FLOPs (2 x MACs) of one CNN exit forward per sample, from its config (``config.flops()``)."""
    return config.flops()


def exit_flops(exit_module: nn.Module, feature_shape: tuple, extra_shape: tuple | None = None) -> int:
    """FLOPs of ``exit_module`` per sample on features of ``feature_shape`` (B, C, H, W)."""
    from .cnn_exit import CNNExit
    from .slvit_exit import SLViTExit

    if isinstance(exit_module, SLViTExit):
        return slvit_flops(exit_module.config)
    if isinstance(exit_module, CNNExit):
        return cnn_exit_flops(exit_module.config)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    kwargs = None if extra_shape is None else {"extra": (1, *extra_shape[1:])}
    probe(exit_module, [(1, *feature_shape[1:])], stop_early=False, context=counter, kwargs=kwargs)
    return int(counter.get_total_flops())


def summary(net: Any, input_size: Any = None) -> Summary:
    """Per-exit parameters, FLOPs, cumulative FLOPs and speedup of a :class:`MultiExitNetwork`.

    ``input_size``: (C, H, W) of one sample, or a list of sizes for a multi-input backbone
    (AudioCSRNet: ``[(3, H, W), (1, frames, 64)]``); default: ``net.input_size`` of a preset.
    """
    if input_size is None:
        input_size = getattr(net, "input_size", None)
        if input_size is None:
            raise ValueError("summary: pass input_size=(C, H, W) (or a list of sizes for several inputs)")
    paths = set(net.exit_modules) | set(net.compaction_points) | set(net.ready_at)
    paths |= {p for p in net.extra_paths if p}
    total, at, shapes = _count(net.backbone, input_size, sorted(paths))  # one fake run: FLOPs and shapes
    rows: list[ExitRow] = []
    running = 0
    names = getattr(net, "branch_names", None) or [f"exit{i}" for i in range(net.num_exits)]
    for i, (key, module) in enumerate(net.exits.items()):
        mpath, epath = net.exit_modules[i], net.extra_paths[i]
        fshape = shapes[mpath]
        eshape = shapes[epath] if epath else None
        ef = exit_flops(module, fshape, eshape)
        running += ef
        bb = at[net.ready_at[i]]
        cost = at[net.compaction_points[i]] + running
        cum = bb + running
        params = sum(p.numel() for p in module.parameters())
        label = net.exit_paths[i] + (f" + {epath}" if epath else "")
        rows.append(ExitRow(names[i], label, fshape, params, ef, bb, cum, cost, total / cum))
    bparams = sum(p.numel() for p in net.backbone.parameters())
    rows.append(ExitRow("final", "(backbone output)", (), bparams, 0, total, total + running,
                        total + running, total / (total + running)))
    title = f"{getattr(net, 'preset_name', type(net.backbone).__name__)} at input {input_size}"
    notes = ["total FLOPs = backbone up to the exit + every exit up to and including it; "
             "speedup = backbone FLOPs / total FLOPs"]
    return Summary(rows, total, bparams, input_size, title, notes)
