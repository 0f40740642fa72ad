"""One ``net.early_exit(x, policy)`` call: per-sample exit decisions and batch compaction.

:class:`MultiExitNetwork` owns the exits and the hooks (``_run`` calls back when an exit's inputs are
ready and after each watched module); everything that belongs to *one* call lives here, in an
:class:`EarlyExitRun` made for that call and dropped after it - so calls from several threads never share
state, and ``multi_exit`` keeps only the network.

Book-keeping per call (all on the input's device):

* ``rows``  - original sample index of each row of the running (possibly compacted) batch;
* ``alive`` - per row of the running batch: not answered yet. An exit decides on the alive rows; rows it
  answers are marked dead, and leave the batch only at the exit's *compaction point* (a block boundary,
  see ``multi_exit``), where :meth:`EarlyExitRun.on_output` returns the module's output without them;
* ``snap``  - the ``rows`` of each watched module's output when it was produced, so an input captured
  before a compaction (the audio embedding of an AV exit) can be cut down to the current rows later.

Where the time of a call goes (ResNet152 at 112x112, batch 64, half the batch leaving at b1, one
interleaved run, issue #14 item 3): the compaction copy ~3 ms and the policy ~0.05 ms, the two exits ~1%
of the full backbone's time, Python and hooks ~0 (nothing per call walks the module tree); the rest is
the backbone itself - all 64 rows through stem..layer2.0 (~25% of its time for ~10% of its FLOPs: the
large early maps are memory-bound), then the remaining rows.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .exit_result import EarlyExitResult
from .policies import Policy
from .shape_probe import shape_of

# `net` below is a slvit_fast.MultiExitNetwork; it is typed as nn.Module because multi_exit imports this
# module (layering is one-way: this file never imports multi_exit, not even for type hints).

__all__ = ["EarlyExitRun", "run_early_exit"]


def as_inputs(x: Any) -> tuple:
    """The backbone's positional inputs: a tuple/list of them, or one input."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def batch_of(inputs: tuple) -> int:
    for t in inputs:
        if isinstance(t, Tensor) and t.dim() > 0:
            return int(t.shape[0])
    raise TypeError("MultiExitNetwork: the backbone input must contain a tensor with a batch dimension")


class AllExited(Exception):
    """Raised from a hook to stop the backbone once no sample is left."""


def select_rows(t: Tensor, keep: Tensor) -> Tensor:
    """``t.index_select(0, keep)`` in ``t``'s memory format. ``index_select`` returns NCHW-contiguous rows;
    from a channels_last backbone (the faster CPU layout) that would send every later conv through a
    layout conversion, so channels_last maps are selected as the NHWC arrays they are (one copy, same bits)."""
    if t.dim() in (4, 5) and not t.is_contiguous():
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        if t.is_contiguous(memory_format=fmt):
            last = (0, *range(2, t.dim()), 1)   # N, spatial..., C: contiguous
            back = (0, t.dim() - 1, *range(1, t.dim() - 1))
            return t.permute(last).index_select(0, keep).permute(back)
    return t.index_select(0, keep)


def compact(obj: Any, keep: Tensor, n: int) -> Any:
    """Rows ``keep`` of every tensor in ``obj`` whose leading dimension is the current batch ``n``."""
    if isinstance(obj, Tensor):
        return select_rows(obj, keep) if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(compact(o, keep, n) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(compact(o, keep, n) for o in obj)
    return obj


class EarlyExitRun:
    """State and hook callbacks of one early-exit call (see the module docstring)."""

    def __init__(self, net: nn.Module, policy: Policy, B: int, device: torch.device,
                 user_extra: Mapping[int, Tensor]):
        self.net = net
        self.policy = policy
        self.B = B
        self.user_extra = user_extra
        self.state = policy.start(B, net.num_exits, device)
        self.rows = torch.arange(B, device=device)  # original index of each row in the running batch
        self.alive = torch.ones(B, dtype=torch.bool, device=device)
        self.n_alive = B  # alive.sum() kept on the host: no device round trip per exit
        self.outputs: Tensor | None = None
        self.exit_index = torch.full((B,), -1, dtype=torch.long, device=device)
        self.evaluated: dict[int, int] = {}
        self.prev: tuple[Tensor, Tensor, int] | None = None  # anytime: last finished exit's answers
        self.snap: dict[str, Tensor] = {}
        self.compaction_of: set[str] = set(net.compaction_points)

    # -- hook callbacks (MultiExitNetwork._run) ---------------------------------------------------
    def on_ready(self, i: int, feat: Any, extra_t: Any) -> None:
        """Exit ``i`` has its inputs: run it on the alive rows and let the policy pick who leaves."""
        net, policy, state = self.net, self.policy, self.state
        if extra_t is None and i in self.user_extra:
            extra_t = self.user_extra[i][self.rows]
        feat, extra_t = self.fresh(net.exit_modules[i], feat), self.fresh(net.extra_paths[i], extra_t)
        if self.n_alive == 0:
            raise AllExited
        if policy.anytime and i > 0 and policy.expired(state):
            self.finish_previous(i)
            raise AllExited
        all_alive = self.n_alive == self.alive.numel()
        idx = self.alive.nonzero().squeeze(1) if not all_alive else None
        f = feat if all_alive else feat.index_select(0, idx)
        e = extra_t if (extra_t is None or all_alive) else extra_t.index_select(0, idx)
        out = net._call_exit(i, f, e)
        self.evaluated[i] = self.n_alive
        orig = self.rows if all_alive else self.rows.index_select(0, idx)
        if policy.anytime:
            if i > 0 and policy.expired(state):
                self.finish_previous(i)
                raise AllExited
            self.prev = (orig, out, i)
            return
        decide = policy.decide(state, i, out, orig)
        if not isinstance(decide, Tensor) or decide.dtype != torch.bool or decide.shape != (self.n_alive,):
            raise TypeError(f"{type(policy).__name__}.decide must return a bool tensor of shape "
                            f"({self.n_alive},), got {shape_of(decide)} {getattr(decide, 'dtype', '')}")
        leaving = decide.nonzero().squeeze(1)
        if leaving.numel() == 0:
            return
        self.record(i, orig.index_select(0, leaving), out.index_select(0, leaving))
        self.alive[leaving if all_alive else idx.index_select(0, leaving)] = False
        self.n_alive -= int(leaving.numel())
        if self.n_alive == 0:
            raise AllExited

    def on_output(self, path: str, output: Any) -> Any:
        """After a watched module: at a compaction point, drop the rows that have left."""
        self.snap[path] = self.rows  # rows of this module's (uncompacted) output, for late readers
        if path not in self.compaction_of or self.n_alive == self.rows.numel():
            return None
        keep = self.alive.nonzero().squeeze(1)
        n = self.rows.numel()
        self.rows = self.rows.index_select(0, keep)
        self.alive = self.alive.index_select(0, keep)
        return compact(output, keep, n)

    # -- book-keeping -----------------------------------------------------------------------------
    def fresh(self, path: str | None, t: Any) -> Any:
        """A captured output whose rows predate a compaction, restricted to the current rows."""
        snap = self.snap.get(path) if path else None
        if t is None or snap is None or snap.numel() == self.rows.numel():
            return t
        return compact(t, torch.searchsorted(snap, self.rows), snap.numel())

    def record(self, i: int, orig: Tensor, out: Tensor) -> None:
        if orig.numel() == 0:
            return
        if self.outputs is None:
            self.outputs = torch.full((self.B, *out.shape[1:]), float("nan"), dtype=out.dtype, device=out.device)
        elif tuple(out.shape[1:]) != tuple(self.outputs.shape[1:]):
            raise RuntimeError(
                f"exit {i} returns outputs of shape {tuple(out.shape[1:])} per sample, earlier exits "
                f"{tuple(self.outputs.shape[1:])}: every exit and the final output need the same output size"
            )
        self.outputs[orig] = out.to(self.outputs.dtype)
        self.exit_index[orig] = i

    def finish_previous(self, i: int) -> None:
        """Anytime: the deadline passed before exit ``i`` finished; alive samples take the last answer."""
        assert self.prev is not None
        orig, out, j = self.prev
        alive_orig = set(self.rows[self.alive].tolist())
        mask = torch.tensor([o in alive_orig for o in orig.tolist()], dtype=torch.bool, device=orig.device)
        self.record(j, orig[mask], out[mask])
        self.alive[:] = False
        self.n_alive = 0

    def finish(self, final: Any) -> EarlyExitResult:
        """The backbone's final output (None if it stopped early) answers every sample still alive."""
        num_exits = self.net.num_exits
        if final is not None:
            if not isinstance(final, Tensor) or final.shape[0] != self.rows.numel():
                raise RuntimeError(
                    f"after batch compaction the backbone returned {shape_of(final)} for {self.rows.numel()} "
                    "remaining samples: a compaction point is not safe for this backbone; pass compact_at="
                )
            self.evaluated[num_exits] = self.n_alive
            if self.policy.anytime and self.prev is not None and self.policy.expired(self.state):
                self.finish_previous(num_exits)
            elif self.n_alive:
                if self.n_alive == self.rows.numel():
                    self.record(num_exits, self.rows, final)
                else:
                    idx = self.alive.nonzero().squeeze(1)
                    self.record(num_exits, self.rows.index_select(0, idx), final.index_select(0, idx))
        if (self.exit_index < 0).any():
            raise RuntimeError("internal error: some samples got no answer")
        counts = torch.bincount(self.exit_index, minlength=num_exits + 1).tolist()
        evaluated = [self.evaluated.get(i, 0) for i in range(num_exits + 1)]
        return EarlyExitResult(self.outputs, self.exit_index, counts, evaluated)


def run_early_exit(net: nn.Module, x: Any, policy: Any, extra: Any = None) -> EarlyExitResult:
    """The body of :meth:`MultiExitNetwork.early_exit` (see there and the ``multi_exit`` docstring)."""
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a slvit_fast.policies.Policy, got {type(policy).__name__}")
    policy.check(net.num_exits)
    for m in net._batchnorms:
        if m.training:
            raise RuntimeError("early_exit needs the backbone in eval mode (BatchNorm in training mode "
                               "mixes samples); call net.eval()")
    inputs = as_inputs(x)
    B = batch_of(inputs)
    costs = functools.partial(net._flop_costs, tuple(tuple(t.shape[1:]) for t in inputs if isinstance(t, Tensor)))
    if B == 0:  # the same empty answer as policies.apply on empty outputs
        final = net._empty_outputs(inputs, extra)[-1]
        zeros = [0] * (net.num_exits + 1)
        return EarlyExitResult(final, torch.empty(0, dtype=torch.long, device=final.device), zeros, list(zeros),
                               cost_source=costs)
    user_extra = net._user_extras(extra, B)
    device = next((t.device for t in inputs if isinstance(t, Tensor)), torch.device("cpu"))
    run = EarlyExitRun(net, policy, B, device, user_extra)
    try:
        final = net._run(inputs, run.on_ready, run.on_output)
    except AllExited:
        final = None
    except RuntimeError as e:
        if run.rows.numel() == B or "batch compaction" in str(e):
            raise
        raise RuntimeError(
            f"{e}\n(slvit_fast: the backbone failed after batch compaction dropped rows at "
            f"{sorted(set(net.compaction_points))}; if this is a shape mismatch, a tensor computed before "
            "a compaction point is used after it - pass compact_at={exit path: later module path})"
        ) from e
    result = run.finish(final)
    result.cost_source = costs
    return result


def batchnorm_modules(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's BatchNorm modules (early_exit refuses to run while one is in training mode)."""
    return [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
