"""Paired tolerances, the test suite's method (tests/kernel_cases.py), as data instead of asserts.

A backend's output or gradient in some dtype is compared with the float64 reference. It may err at most
``factor`` times what the torch reference itself errs *in the same dtype* (also vs float64), plus a
small floor relative to the tensor's scale: tight where the reference is exact, loose only where the
dtype forces it. "tf32" is float32 storage with TF32 matmuls allowed (CUDA only): 10 mantissa bits
like fp16, hence fp16's factor and floor.
"""

from __future__ import annotations

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


def paired_check(name: str, ours: torch.Tensor | None, ref_lowp: torch.Tensor, ref64: torch.Tensor,
                 tol: Tolerance) -> TensorCheck:
    """Compare ``ours`` with ``ref64``, allowing what ``ref_lowp`` (the reference in ours' dtype) errs."""
    nan = float("nan")
    if ours is None:
        return TensorCheck(name, nan, nan, nan, nan, False, "backend produced no value/gradient")
    if tuple(ours.shape) != tuple(ref64.shape):
        return TensorCheck(name, nan, nan, nan, nan, False,
                           f"shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}")
    ours64, low64, ref64 = ours.detach().double(), ref_lowp.detach().double(), ref64.detach().double()
    finite = torch.isfinite(ref64)
    if not torch.equal(torch.isfinite(ours64), finite):
        bad = int((torch.isfinite(ours64) != finite).sum())
        return TensorCheck(name, nan, nan, nan, nan, False,
                           f"{bad} non-finite value(s) where the reference has none (or the reverse)")
    if finite.any():
        scale = ref64[finite].abs().max().item()
        ref_err = (low64 - ref64)[finite].abs().max().item()
        err = (ours64 - ref64)[finite].abs().max().item()
    else:
        scale = ref_err = err = 0.0
    bound = tol.factor * ref_err + tol.floor * max(scale, 1e-30)
    return TensorCheck(name, err, bound, ref_err, scale, err <= bound)
