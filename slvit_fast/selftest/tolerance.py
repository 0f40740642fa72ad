"""Paired tolerances, the test suite's method (tests/kernel_cases.py), as data instead of asserts.

A backend's output or gradient in some dtype is compared with the float64 reference. It may err at most
``factor`` times what the torch reference itself errs *in the same dtype* (also vs float64), plus a
small floor relative to the tensor's scale: tight where the reference is exact, loose only where the
dtype forces it. "tf32" is float32 storage with TF32 matmuls allowed (CUDA only): 10 mantissa bits
like fp16, hence fp16's factor and floor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    factor: float  # times the torch reference's own error in this dtype
    floor: float  # relative to the float64 tensor's max |value|


# fp32 / fp16 / bf16 are the test suite's values (tests/kernel_cases.py TOLERANCES).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(factor=8.0, floor=2e-6),
    "tf32": Tolerance(factor=4.0, floor=2e-3),
    "fp16": Tolerance(factor=4.0, floor=2e-3),
    "bf16": Tolerance(factor=4.0, floor=1.6e-2),
}

# dtype name -> (storage dtype, float32 matmul precision to run it with, or None to leave it alone)
DTYPES: dict[str, tuple[torch.dtype, str | None]] = {
    "fp32": (torch.float32, "highest"),
    "tf32": (torch.float32, "high"),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
}


@dataclass
class TensorCheck:
    """One compared tensor (the output, or the gradient of one input/parameter)."""

    name: str
    error: float  # max |ours - float64| over finite reference entries
    bound: float  # factor * reference error + floor * scale
    reference_error: float  # max |torch reference in this dtype - float64|
    scale: float  # max |float64 value|
    ok: bool
    problem: str = ""  # why it failed beyond the error bound (missing, shape, non-finite pattern)

    @property
    def ratio(self) -> float:
        """error / bound (<= 1 passes); inf for a structural problem."""
        if self.problem:
            return float("inf")
        return self.error / self.bound if self.bound > 0 else (0.0 if self.error == 0 else float("inf"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


@dataclass
class ReferenceStats:
    """What every backend's tensor is compared with, computed once per tensor and dtype."""

    ref64: torch.Tensor  # float64 reference values
    finite: torch.Tensor | None  # mask of finite reference entries; None when all are finite (fast path)
    scale: float  # max |finite reference value|
    reference_error: float  # max |reference in the dtype - float64| over finite entries


def reference_stats(ref_lowp: torch.Tensor, ref64: torch.Tensor) -> ReferenceStats:
    ref64 = ref64.detach().double()
    low64 = ref_lowp.detach().double()
    finite = torch.isfinite(ref64)
    if bool(finite.all()):
        if ref64.numel() == 0:
            return ReferenceStats(ref64, None, 0.0, 0.0)
        return ReferenceStats(ref64, None, ref64.abs().max().item(), (low64 - ref64).abs().max().item())
    if not finite.any():
        return ReferenceStats(ref64, finite, 0.0, 0.0)
    return ReferenceStats(ref64, finite, ref64[finite].abs().max().item(),
                          (low64 - ref64)[finite].abs().max().item())


def paired_check(name: str, ours: torch.Tensor | None, ref_lowp: torch.Tensor | ReferenceStats,
                 ref64: torch.Tensor | None, tol: Tolerance) -> TensorCheck:
    """Compare ``ours`` with ``ref64``, allowing what ``ref_lowp`` (the reference in ours' dtype) errs.

    ``ref_lowp`` may instead be the :class:`ReferenceStats` of the pair (then ``ref64`` is unused), so
    several backends share one pass over the references.
    """
    stats = ref_lowp if isinstance(ref_lowp, ReferenceStats) else reference_stats(ref_lowp, ref64)
    nan = float("nan")
    if ours is None:
        return TensorCheck(name, nan, nan, nan, nan, False, "backend produced no value/gradient")
    ref64 = stats.ref64
    if tuple(ours.shape) != tuple(ref64.shape):
        return TensorCheck(name, nan, nan, nan, nan, False,
                           f"shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}")
    ours64 = ours.detach().double()
    bound = tol.factor * stats.reference_error + tol.floor * max(stats.scale, 1e-30)
    if stats.finite is None:  # common case: one pass; a NaN/inf of ours shows up as a non-finite error
        err = (ours64 - ref64).abs().max().item() if ref64.numel() else 0.0
        if not math.isfinite(err):
            bad = int((~torch.isfinite(ours64)).sum())
            return TensorCheck(name, nan, bound, stats.reference_error, stats.scale, False,
                               f"{bad} non-finite value(s) where the reference has none")
    else:
        if not torch.equal(torch.isfinite(ours64), stats.finite):
            bad = int((torch.isfinite(ours64) != stats.finite).sum())
            return TensorCheck(name, nan, bound, stats.reference_error, stats.scale, False,
                               f"{bad} entries non-finite in one of ours and the reference but not the other")
        err = (ours64 - ref64)[stats.finite].abs().max().item() if stats.finite.any() else 0.0
    return TensorCheck(name, err, bound, stats.reference_error, stats.scale, err <= bound)
