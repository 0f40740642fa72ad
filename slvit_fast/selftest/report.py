"""The self-test's result: rows (backend x preset x dtype), timing cases, the one-screen verdict, JSON.

A row fails when the backend raised, returned the wrong dtype, or any compared tensor (output, input
gradients, parameter gradients) is outside its paired tolerance. The exit code is 1 when any row
fails, else 0. Timing never fails the self-test (a slow backend is a finding, not a mismatch), but a
backend that crashes while being timed does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .plan import BackendPlan
from .timing import TimingCase
from .tolerance import DTYPES

SCHEMA = "slvit_fast.selftest/1"


@dataclass
class Row:
    backend: str
    preset: str
    dtype: str
    batch: int
    ok: bool
    same_config_as: str | None  # checked once under this preset (identical exit configuration)
    error: str
    max_errors: dict[str, Any]
    checks: list[dict]
    launches: int | None
    launches_note: str
    first_call_s: float
    timing: dict[str, Any] | None = None  # batch -> {exit_s, eager_s, speedup_vs_*} where timed
    in_channels: int | None = None  # feature-map channels checked (capped for --quick / emulators)
    timing_note: str = ""  # why ``timing`` is null for this row

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SelftestReport:
    device: str
    quick: bool
    environment: dict[str, Any]
    backends: list[BackendPlan]
    rows: list[Row] = field(default_factory=list)
    timing: list[TimingCase] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall seconds

    # -- outcome ---------------------------------------------------------------------------------------
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]

    def timing_failures(self) -> list[str]:
        ours = {b.name for b in self.backends} - {"torch"}
        return [f"{c.preset} {c.dtype} b{c.batch} {impl}: {err}" for c in self.timing
                for impl, err in c.errors.items() if impl in ours]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.failures() and not self.timing_failures()

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    # -- JSON ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "device": self.device,
            "quick": self.quick,
            "passed": self.passed,
            "failures": len(self.failures()) + len(self.timing_failures()),
            "environment": self.environment,
            "seconds": self.seconds,
            "backends": [{"name": b.name, "checked": b.skipped is None, "dtypes": list(b.dtypes),
                          "skipped": b.skipped, "note": b.note,
                          "dtype_skips": {d: why for d, why in b.dtype_skips}} for b in self.backends],
            "rows": [r.to_dict() for r in self.rows],
            "timing": [c.to_dict() for c in self.timing],
            "timing_failures": self.timing_failures(),
            "notes": self.notes,
        }

    # -- the one-screen verdict -------------------------------------------------------------------------
    def verdict(self, max_failures: int = 8) -> str:
        env = self.environment
        dtypes = [d for d in DTYPES if any(d in b.dtypes for b in self.backends)]
        lines = [f"slvit-fast selftest  device={self.device}  quick={'yes' if self.quick else 'no'}  "
                 f"torch {env.get('torch')}  slvit_fast {env.get('slvit_fast')}  {env.get('device_name', '')}".rstrip()]
        head = f"{'backend':<10}" + "".join(f"{d:>12}" for d in dtypes) + f"{'launches/fwd':>14}  {'worst err/bound':>15}  note"
        lines += [head, "-" * min(len(head) + 20, 110)]
        for b in self.backends:
            if b.skipped is not None:
                lines.append(f"{b.name:<10}skipped: {b.skipped}"[:160])
                continue
            rows = [r for r in self.rows if r.backend == b.name]
            cells = ""
            for d in dtypes:
                rs = [r for r in rows if r.dtype == d]
                if not rs:
                    cells += f"{'-':>12}"
                else:
                    bad = sum(not r.ok for r in rs)
                    cells += f"{f'{len(rs)}/{len(rs)} ok' if not bad else f'FAIL {bad}/{len(rs)}':>12}"
            launches = sorted({r.launches for r in rows if r.launches is not None})
            lt = "n/a" if not launches else (str(launches[0]) if len(launches) == 1 else f"{launches[0]}-{launches[-1]}")
            ratios = [r.max_errors.get("error_over_bound") for r in rows if r.max_errors.get("error_over_bound") is not None]
            worst = f"{max(ratios):.3f}" if ratios else "-"
            lines.append(f"{b.name:<10}{cells}{lt:>14}  {worst:>15}  {b.note}"[:160])
        for c in self.timing:
            lines.append(self._timing_line(c))
        if self.timing:
            lines.append("  (median per-call time, interleaved rounds; ratio = eager time / this time)")
        fails = self.failures()
        for r in fails[:max_failures]:
            lines.append(f"FAIL {r.backend} {r.preset} {r.dtype} b{r.batch}: {_row_problem(r)}"[:200])
        if len(fails) > max_failures:
            lines.append(f"... and {len(fails) - max_failures} more failing rows (see --json)")
        for t in self.timing_failures():
            lines.append(f"FAIL timing {t}"[:200])
        lines += [f"note: {n}"[:200] for n in self.notes]
        total = self.seconds.get("total")
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items() if k in ("correctness", "launches", "timing"))
        if "triton_first_calls" in self.seconds:
            phases += (f"; Triton first calls (JIT compile + first run, inside correctness) "
                       f"{self.seconds['triton_first_calls']:.0f} s")
        lines.append(f"wall time {total:.0f} s ({phases})" if total is not None else f"({phases})")
        n_checks = sum(len(r.checks) for r in self.rows)
        lines.append(f"VERDICT: {'PASS' if self.passed else 'FAIL'} - {len(self.rows) - len(fails)}/{len(self.rows)} "
                     f"backend x preset x dtype rows within paired tolerance ({n_checks} tensors compared)")
        return "\n".join(lines)

    @staticmethod
    def _timing_line(c: TimingCase) -> str:
        parts = []
        for impl, s in c.seconds.items():
            ratio = c.speedup(impl, "eager")
            parts.append(f"{impl} {_fmt(s)}" + ("" if impl == "eager" or ratio is None else f" ({ratio:.2f}x)"))
        errs = "".join(f"; {k}: failed" for k in c.errors)
        return f"time {c.preset} {c.dtype} b{c.batch}: " + ", ".join(parts) + errs


def _fmt(s: float) -> str:
    return f"{s * 1e6:.0f}us" if s < 1e-3 else f"{s * 1e3:.2f}ms"


def _row_problem(r: Row) -> str:
    if r.error:
        return r.error
    bad = [c for c in r.checks if not c["ok"]]
    worst = max(bad, key=lambda c: c["ratio"], default=None)
    if worst is None:
        return "no tensors compared"
    if worst["problem"]:
        return f"{worst['name']}: {worst['problem']} ({len(bad)} tensor(s) failing)"
    return (f"{worst['name']}: error {worst['error']:.3e} > bound {worst['bound']:.3e} (reference in this dtype "
            f"errs {worst['reference_error']:.3e}; {len(bad)} tensor(s) failing)")


REQUIRED_ROW_KEYS = {"backend": str, "preset": str, "dtype": str, "batch": int, "ok": bool, "max_errors": dict,
                     "checks": list, "launches_note": str, "first_call_s": float}


def validate_report(d: dict) -> list[str]:
    """Problems with a self-test JSON document (empty when it follows the schema)."""
    problems = []
    for key, typ in {"schema": str, "device": str, "quick": bool, "passed": bool, "rows": list, "timing": list,
                     "backends": list, "environment": dict, "seconds": dict}.items():
        if not isinstance(d.get(key), typ):
            problems.append(f"top-level {key!r} missing or not {typ.__name__}")
    if d.get("schema") != SCHEMA:
        problems.append(f"schema {d.get('schema')!r} != {SCHEMA!r}")
    for i, row in enumerate(d.get("rows") or []):
        for key, typ in REQUIRED_ROW_KEYS.items():
            if not isinstance(row.get(key), typ):
                problems.append(f"rows[{i}].{key} missing or not {typ.__name__}")
        if not (row.get("launches") is None or isinstance(row.get("launches"), int)):
            problems.append(f"rows[{i}].launches must be an int or null")
        me = row.get("max_errors") or {}
        for key in ("output", "gradient", "error_over_bound"):
            if key not in me:
                problems.append(f"rows[{i}].max_errors.{key} missing")
        if row.get("dtype") not in DTYPES:
            problems.append(f"rows[{i}].dtype {row.get('dtype')!r} not one of {list(DTYPES)}")
    for i, c in enumerate(d.get("timing") or []):
        if not isinstance(c.get("seconds"), dict) or not all(v > 0 for v in c["seconds"].values()):
            problems.append(f"timing[{i}].seconds must map implementations to positive seconds")
    return problems
