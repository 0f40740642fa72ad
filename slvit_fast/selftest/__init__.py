"""``slvit-fast selftest``: is every backend right, and fast, on this device? One command, minutes.

For every backend usable on the device x every paper preset x every dtype the backend supports
(fp32; tf32 on CUDA; bf16/fp16): the output and every gradient (feature map, extra tokens, every
parameter) against a float64 reference with the test suite's paired tolerances; kernel launches per
exit forward; inference timing at batch 1 and 64 against eager PyTorch and torch.compile anchors.
A one-screen verdict, a JSON document (:data:`SCHEMA`), exit code 1 on any mismatch.

    from slvit_fast.selftest import run_selftest
    report = run_selftest("cpu", quick=True, json_path="out.json")
    print(report.verdict()); raise SystemExit(report.exit_code)
"""

from .report import SCHEMA, Row, SelftestReport, validate_report
from .runner import run_selftest
from .tolerance import DTYPES, TOLERANCES, Tolerance, paired_check

__all__ = ["run_selftest", "SelftestReport", "Row", "SCHEMA", "validate_report", "TOLERANCES", "Tolerance",
           "DTYPES", "paired_check"]
