"""Exit policies: which samples leave at which exit.

A policy sees, at exit ``i``, the outputs (n, K) of the samples still running and returns a boolean mask
of those that exit there; samples that never exit get the backbone's final output. The same policy
object drives :meth:`slvit_fast.MultiExitNetwork.early_exit` (real early exit, batch compaction) and
:func:`apply` (brute force on the outputs of every exit, e.g. from ``net(x)``), which give the same
answer.

Classification policies work on logits (softmax taken here):

* :class:`MaxSoftmax` - exit when the top softmax probability >= threshold.
* :class:`Entropy` - exit when the softmax entropy (nats; ``normalized=True``: divided by log K) <= threshold.
* :class:`Margin` - exit when top-1 minus top-2 probability >= threshold.
* :class:`Patience` - exit when the top-1 class stayed the same over ``n`` consecutive exits (PABEE).
* :class:`ClassThresholds` - class-specific thresholds (seeds/003): exit i accepts a sample predicted as
  class c when its top probability >= ``t[i][c]``; ``inf`` means exit i never accepts class c.
* :class:`RegressionCriterion` - any user criterion ``fn(exit_index, output, previous_output) -> mask``
  (regression exits such as AudioCSRNet's crowd count).
* :class:`Deadline` - anytime prediction: exits run in order; when the deadline passes, every sample gets
  the deepest exit that finished before it (the first exit always runs).

Thresholds: one number for every exit, or a sequence with one entry per early exit (``None`` = never
exit there). Non-finite values and a wrong count are errors. :func:`calibrate_budget` picks thresholds
for budgeted batch classification (seeds/004 Algorithm 1, as in MSDNet).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .exit_result import EarlyExitResult

__all__ = [
    "Policy", "MaxSoftmax", "Entropy", "Margin", "Patience", "ClassThresholds", "RegressionCriterion",
    "Deadline", "apply", "EarlyExitResult",
]


class Policy:
    """Base class. Subclasses implement :meth:`decide`; ``start`` makes per-call state."""

    anytime = False

    def check(self, num_exits: int) -> None:
        """Raise ``ValueError`` if this policy cannot drive a network with ``num_exits`` early exits."""

    def start(self, batch_size: int, num_exits: int, device: torch.device) -> dict:
        self.check(num_exits)
        return {"batch_size": batch_size, "device": device}

    def decide(self, state: dict, exit_index: int, outputs: Tensor, rows: Tensor) -> Tensor:
        """Bool mask (n,): which of the n samples (original indices ``rows``) exit at ``exit_index``."""
        raise NotImplementedError

    def expired(self, state: dict) -> bool:  # anytime policies only
        return False


def _check_logits(outputs: Tensor, what: str) -> None:
    if outputs.dim() != 2 or outputs.shape[1] < 2:
        raise ValueError(f"{what} needs classification logits (n, K>=2), got shape {tuple(outputs.shape)}")


def _thresholds(values: Any, name: str, lo: float | None, hi: float | None) -> float | list[float | None]:
    def one(v: Any) -> float | None:
        if v is None:
            return None
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: threshold {v!r} is not a number") from None
        if not math.isfinite(f):
            raise ValueError(f"{name}: threshold {v!r} is not finite (use None for 'never exit here')")
        if (lo is not None and f < lo) or (hi is not None and f > hi):
            raise ValueError(f"{name}: threshold {f} outside [{lo}, {hi}]")
        return f

    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        if len(values) == 0:
            raise ValueError(f"{name}: empty threshold list")
        return [one(v) for v in values]
    out = one(values)
    if out is None:
        raise ValueError(f"{name}: a single threshold must be a number")
    return out


class _ScorePolicy(Policy):
    """Exit when ``score(outputs)`` compares favourably with the exit's threshold."""

    lo: float | None = 0.0
    hi: float | None = 1.0
    higher_exits = True

    def __init__(self, thresholds: float | Sequence[float | None]):
        self.thresholds = _thresholds(thresholds, type(self).__name__, self.lo, self.hi)

    def check(self, num_exits: int) -> None:
        if isinstance(self.thresholds, list) and len(self.thresholds) != num_exits:
            raise ValueError(
                f"{type(self).__name__}: got {len(self.thresholds)} thresholds for {num_exits} early exits "
                "(one per early exit; the final output takes every remaining sample)"
            )

    def threshold(self, i: int) -> float | None:
        return self.thresholds[i] if isinstance(self.thresholds, list) else self.thresholds

    def score(self, outputs: Tensor) -> Tensor:
        raise NotImplementedError

    def decide(self, state: dict, exit_index: int, outputs: Tensor, rows: Tensor) -> Tensor:
        t = self.threshold(exit_index)
        if t is None:
            return torch.zeros(outputs.shape[0], dtype=torch.bool, device=outputs.device)
        s = self.score(outputs)
        return s >= t if self.higher_exits else s <= t

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.thresholds!r})"


class MaxSoftmax(_ScorePolicy):
    """Exit when max softmax probability >= threshold (in [0, 1])."""

    def score(self, outputs: Tensor) -> Tensor:
        _check_logits(outputs, "MaxSoftmax")
        return torch.softmax(outputs.float(), dim=1).amax(dim=1)


class Entropy(_ScorePolicy):
    """Exit when the softmax entropy <= threshold (nats, or fraction of log K with ``normalized=True``)."""

    hi = None
    higher_exits = False

    def __init__(self, thresholds: float | Sequence[float | None], normalized: bool = False):
        super().__init__(thresholds)
        self.normalized = bool(normalized)

    def score(self, outputs: Tensor) -> Tensor:
        _check_logits(outputs, "Entropy")
        logp = torch.log_softmax(outputs.float(), dim=1)
        h = -(logp.exp() * logp).sum(dim=1)
        return h / math.log(outputs.shape[1]) if self.normalized else h


class Margin(_ScorePolicy):
    """Exit when (top-1 - top-2) softmax probability >= threshold."""

    def score(self, outputs: Tensor) -> Tensor:
        _check_logits(outputs, "Margin")
        top = torch.softmax(outputs.float(), dim=1).topk(2, dim=1).values
        return top[:, 0] - top[:, 1]


class Patience(Policy):
    """Exit once the top-1 class has not changed over ``n`` consecutive exits (PABEE's patience).

    At exit i the counter is the number of exits in a row, ending at i, whose prediction equals the
    previous exit's: ``Patience(1)`` exits as soon as two consecutive exits agree.
    """

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Patience: n must be a positive int, got {n!r}")
        self.n = n

    def start(self, batch_size: int, num_exits: int, device: torch.device) -> dict:
        state = super().start(batch_size, num_exits, device)
        state["pred"] = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        state["count"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return state

    def decide(self, state: dict, exit_index: int, outputs: Tensor, rows: Tensor) -> Tensor:
        _check_logits(outputs, "Patience")
        pred = outputs.argmax(dim=1)
        same = pred == state["pred"][rows]
        count = torch.where(same, state["count"][rows] + 1, torch.zeros_like(pred))
        state["count"][rows] = count
        state["pred"][rows] = pred
        return count >= self.n

    def __repr__(self) -> str:
        return f"Patience({self.n})"


class ClassThresholds(Policy):
    """Class-specific exit thresholds (seeds/003): ``t[i][c]`` for exit i and predicted class c.

    A sample whose top-1 class at exit i is c exits when its top softmax probability >= ``t[i][c]``.
    ``inf`` (or None) means exit i never accepts class c - the class-specific design accepts only the
    targeted classes early. NaN and -inf are errors.
    """

    def __init__(self, per_exit_per_class: Any):
        rows = per_exit_per_class.tolist() if isinstance(per_exit_per_class, Tensor) else per_exit_per_class
        try:
            rows = [[math.inf if v is None else float(v) for v in r] for r in rows]
        except (TypeError, ValueError):
            raise ValueError("ClassThresholds: expected a (num_exits, num_classes) table of numbers") from None
        if not rows or len({len(r) for r in rows}) != 1 or len(rows[0]) == 0:
            raise ValueError("ClassThresholds: expected a non-empty rectangular (num_exits, num_classes) table")
        for i, r in enumerate(rows):
            for c, v in enumerate(r):
                if math.isnan(v) or v == -math.inf:
                    raise ValueError(f"ClassThresholds: threshold [{i}][{c}] is {v}; use a number in [0, 1] or inf")
        self.table = torch.tensor(rows, dtype=torch.float32)

    def check(self, num_exits: int) -> None:
        if self.table.shape[0] != num_exits:
            raise ValueError(f"ClassThresholds: table has {self.table.shape[0]} rows for {num_exits} early exits")

    def decide(self, state: dict, exit_index: int, outputs: Tensor, rows: Tensor) -> Tensor:
        _check_logits(outputs, "ClassThresholds")
        if outputs.shape[1] != self.table.shape[1]:
            raise ValueError(f"ClassThresholds: table has {self.table.shape[1]} classes, outputs {outputs.shape[1]}")
        conf, pred = torch.softmax(outputs.float(), dim=1).max(dim=1)
        return conf >= self.table[exit_index].to(outputs.device)[pred]

    def __repr__(self) -> str:
        return f"ClassThresholds({self.table.tolist()!r})"


class RegressionCriterion(Policy):
    """Exit by a user criterion: ``fn(exit_index, output, previous) -> bool mask (n,)``.

    ``output`` (n, K) is this exit's output for the running samples, ``previous`` the previous exit's
    output for the same samples (None at exit 0). Example - exit when two consecutive crowd-count
    estimates agree within 2 people: ``RegressionCriterion(lambda i, y, prev: prev is not None and
    (y - prev).abs()[:, 0] < 2)`` (returning a plain bool applies to every sample).
    """

    def __init__(self, fn: Callable[[int, Tensor, Tensor | None], Any]):
        if not callable(fn):
            raise TypeError(f"RegressionCriterion needs a callable, got {type(fn).__name__}")
        self.fn = fn

    def start(self, batch_size: int, num_exits: int, device: torch.device) -> dict:
        state = super().start(batch_size, num_exits, device)
        state["prev"] = None
        return state

    def decide(self, state: dict, exit_index: int, outputs: Tensor, rows: Tensor) -> Tensor:
        prev = None if state["prev"] is None else state["prev"][rows]
        mask = self.fn(exit_index, outputs, prev)
        n = outputs.shape[0]
        if isinstance(mask, bool):
            mask = torch.full((n,), mask, dtype=torch.bool, device=outputs.device)
        mask = torch.as_tensor(mask, device=outputs.device)
        if mask.dtype != torch.bool or tuple(mask.shape) != (n,):
            raise ValueError(f"RegressionCriterion: the criterion must return a bool mask of shape ({n},), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if state["prev"] is None:
            state["prev"] = torch.zeros((state["batch_size"], *outputs.shape[1:]), dtype=outputs.dtype,
                                        device=outputs.device)
        state["prev"][rows] = outputs
        return mask



class Deadline(Policy):
    """Anytime prediction: answer with the deepest exit that finished before ``seconds`` elapsed.

    The clock starts when ``early_exit`` starts. No sample leaves early before the deadline; when it
    passes, the network stops and every sample gets the last finished exit's output (exit 0 always
    runs, so with a very short deadline the answer is exit 0's, late). ``Deadline(math.inf)`` runs the
    whole backbone. ``clock`` (default ``time.perf_counter``) can be replaced for tests.
    """

    anytime = True

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter):
        seconds = float(seconds)
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"Deadline: seconds must be >= 0, got {seconds}")
        self.seconds = seconds
        self.clock = clock

    def start(self, batch_size: int, num_exits: int, device: torch.device) -> dict:
        state = super().start(batch_size, num_exits, device)
        state["t0"] = self.clock()
        return state

    def expired(self, state: dict) -> bool:
        return self.clock() - state["t0"] > self.seconds

    def decide(self, state: dict, exit_index: int, outputs: Tensor, rows: Tensor) -> Tensor:
        return torch.zeros(outputs.shape[0], dtype=torch.bool, device=outputs.device)

    def __repr__(self) -> str:
        return f"Deadline({self.seconds})"



# -- brute force ------------------------------------------------------------------------------------
def apply(policy: Policy, outputs: Sequence[Tensor], finish_times: Sequence[float] | None = None, *,
          exit_costs: Sequence[float] | None = None, backbone_flops: float | None = None) -> EarlyExitResult:
    """Apply ``policy`` to the outputs of every exit on every sample (``outputs`` as returned by
    ``net(x)``: early exits then the final output). Returns an :class:`EarlyExitResult`; with
    ``exit_costs`` (FLOPs per sample leaving at each output) its ``mean_flops`` is known, with
    ``backbone_flops`` too its ``flops_speedup``.

    For :class:`Deadline`, ``finish_times[j]`` is when exit j (last: the final output) finished, in
    seconds after the start; the answer is the deepest j finished by the deadline (exit 0 at least).
    """
    outputs = list(outputs)
    if len(outputs) < 2:
        raise ValueError("apply: need the outputs of at least one exit and the final output")
    n_exits = len(outputs) - 1
    sizes = [int(o.shape[0]) if isinstance(o, Tensor) and o.dim() > 0 else None for o in outputs]
    if None in sizes or len(set(sizes)) != 1:
        shapes = [tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__ for o in outputs]
        raise ValueError(
            f"apply: every output needs the same batch size (exits 0..{n_exits - 1}, then the final output); "
            f"got shapes {shapes}"
        )
    B = sizes[0]
    device = outputs[0].device
    state = policy.start(B, n_exits, device)
    out = torch.empty((B, *outputs[-1].shape[1:]), dtype=outputs[-1].dtype, device=device)
    idx = torch.full((B,), n_exits, dtype=torch.long, device=device)
    evaluated = [0] * (n_exits + 1)
    if policy.anytime:
        if finish_times is None and math.isinf(policy.seconds):
            finish_times = [0.0] * (n_exits + 1)
        if finish_times is None or len(finish_times) != n_exits + 1:
            raise ValueError(f"apply: an anytime policy needs finish_times for all {n_exits + 1} outputs")
        j = 0
        for k, t in enumerate(finish_times):
            if t <= policy.seconds:
                j = k
        out[:] = outputs[j]
        idx[:] = j
        evaluated = [B] * (j + 1) + [0] * (n_exits - j)
    else:
        alive = torch.ones(B, dtype=torch.bool, device=device)
        for i in range(n_exits):
            rows = alive.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            evaluated[i] = rows.numel()
            o = outputs[i].index_select(0, rows)
            d = policy.decide(state, i, o, rows)
            out[rows[d]] = o[d].to(out.dtype)
            idx[rows[d]] = i
            alive[rows[d]] = False
        rows = alive.nonzero().squeeze(1)
        evaluated[n_exits] = rows.numel()
        out[rows] = outputs[-1].index_select(0, rows)
    counts = torch.bincount(idx, minlength=n_exits + 1).tolist()
    if exit_costs is not None:
        exit_costs = [float(c) for c in exit_costs]
        if len(exit_costs) != n_exits + 1:
            raise ValueError(f"apply: {len(exit_costs)} exit costs for {n_exits + 1} outputs")
    return EarlyExitResult(out, idx, counts, evaluated, exit_costs,
                           None if backbone_flops is None else float(backbone_flops))

