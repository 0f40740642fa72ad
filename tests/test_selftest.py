"""`slvit-fast selftest`: paired tolerances, verdict, JSON schema, and that a wrong backend makes it fail.

Everything runs on tiny exit configurations through ``run_selftest(configs=...)`` so the file takes
seconds; the CUDA path's pure parts (timing plan, tolerance/dtype table) are checked without a GPU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from slvit_fast import SLViTConfig
from slvit_fast import backends as registry
from slvit_fast.selftest import SCHEMA, TOLERANCES, Tolerance, paired_check, run_selftest, validate_report
from slvit_fast.selftest.correctness import matmul_precision
from slvit_fast.selftest.plan import plan_backends, preset_configs
from slvit_fast.selftest.report import SelftestReport
from slvit_fast.selftest.runner import _attach_timing, timing_plan
from slvit_fast.selftest.timing import TimingCase, time_case

TINY = SLViTConfig(in_channels=3, feature_size=(6, 6), patch_size=(2, 2), embed_dim=8, num_heads=2, key_dim=4,
                   mlp_dim=16, head_hidden=8, num_outputs=3)
TINY_EXTRA = TINY.replace(extra_tokens=1, extra_dim=5, num_heads=3)
FAST = ["torch", "cpu"]


def _quiet(_msg):
    pass


def _run(**kw):
    kw.setdefault("configs", {"tiny": TINY, "tiny-extra": TINY_EXTRA})
    kw.setdefault("backends", FAST)
    kw.setdefault("timing", False)
    return run_selftest("cpu", log=_quiet, **kw)


# -- paired tolerance (the test suite's method) -------------------------------------------------------
def test_paired_check_allows_the_reference_error_times_factor_plus_floor():
    ref64 = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    low = ref64 + torch.tensor([1e-3, 0, 0], dtype=torch.float64)  # the reference itself errs 1e-3
    tol = Tolerance(factor=4.0, floor=1e-6)
    bound = 4.0 * 1e-3 + 1e-6 * 4.0
    ok = paired_check("out", ref64 + 0.9 * bound, low, ref64, tol)
    bad = paired_check("out", ref64 + 1.1 * bound, low, ref64, tol)
    assert ok.ok and ok.bound == pytest.approx(bound) and ok.ratio == pytest.approx(0.9)
    assert not bad.ok and bad.ratio == pytest.approx(1.1)
    # where the reference is exact only the floor remains: tight
    assert not paired_check("out", ref64 + 1e-4, ref64, ref64, tol).ok


def test_paired_check_structural_problems_fail():
    ref = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64)
    tol = TOLERANCES["fp32"]
    assert paired_check("g", ref.clone(), ref, ref, tol).ok  # NaN where the reference has NaN is fine
    nan_leak = paired_check("g", torch.tensor([float("nan")] * 3, dtype=torch.float64), ref, ref, tol)
    assert not nan_leak.ok and "non-finite" in nan_leak.problem and math.isinf(nan_leak.ratio)
    assert "no value" in paired_check("g", None, ref, ref, tol).problem
    finite_ref = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)  # the one-pass path (all finite)
    inf_leak = paired_check("g", torch.tensor([1.0, float("inf"), 2.0]), finite_ref, finite_ref, tol)
    assert not inf_leak.ok and "1 non-finite" in inf_leak.problem
    assert "shape" in paired_check("g", ref[:2], ref, ref, tol).problem


def test_tolerances_mirror_the_test_suite_and_tf32_is_cuda_only():
    assert (TOLERANCES["fp32"].factor, TOLERANCES["fp32"].floor) == (8.0, 2e-6)
    assert (TOLERANCES["fp16"].factor, TOLERANCES["fp16"].floor) == (4.0, 2e-3)
    assert (TOLERANCES["bf16"].factor, TOLERANCES["bf16"].floor) == (4.0, 1.6e-2)
    assert all("tf32" not in b.dtypes for b in plan_backends("cpu"))
    before = torch.get_float32_matmul_precision()
    with matmul_precision("high"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


# -- planning ------------------------------------------------------------------------------------------
def test_plan_lists_every_backend_with_a_reason_when_skipped():
    plans = {b.name: b for b in plan_backends("cpu")}
    assert set(plans) == set(registry.KNOWN_BACKENDS)
    assert plans["torch"].dtypes[0] == "fp32" and plans["torch"].skipped is None
    assert plans["cuda"].skipped and "cuda" in plans["cuda"].skipped.lower()
    if plans["triton"].skipped is None:  # this suite sets TRITON_INTERPRET=1
        assert "interpreter" in plans["triton"].note and not plans["triton"].timed
        assert "bf16" not in plans["triton"].dtypes  # the interpreter has no bf16 arithmetic
    with pytest.raises(ValueError, match="unknown backend"):
        plan_backends("cpu", ["tensorrt"])


def test_identical_preset_configs_are_checked_once():
    configs = preset_configs(quick=True)
    assert configs["densenet201-b1"][1] == "resnet152-b1"  # same exit configuration as resnet152-b1
    assert configs["resnet152-b1"][1] is None
    assert all(cfg.in_channels <= 16 for cfg, _ in configs.values())


def test_timing_plan_cuda_has_graph_and_autotune_anchors():
    presets = list(preset_configs(quick=False))
    cuda = timing_plan("cuda", False, presets)
    assert ("resnet152-b1", "bf16", ("compile", "reduce-overhead", "max-autotune")) in cuda
    assert {p for p, _, _ in cuda} == set(presets)  # every preset vs eager on a GPU
    assert timing_plan("cuda", True, presets) == [("resnet152-b1", "bf16", ("compile", "reduce-overhead"))]
    assert timing_plan("cpu", True, presets) == [("resnet152-b1", "fp32", ("compile",))]
    assert all("reduce-overhead" not in a for _, _, a in timing_plan("cpu", False, presets))


# -- the run, the verdict, the JSON --------------------------------------------------------------------
def test_selftest_passes_and_json_follows_the_schema(tmp_path):
    out = tmp_path / "selftest.json"
    report = _run(json_path=str(out))
    assert report.passed and report.exit_code == 0
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert validate_report(doc) == [] and doc["schema"] == SCHEMA and doc["passed"] is True
    rows = {(r["backend"], r["preset"], r["dtype"]) for r in doc["rows"]}
    plans = {b.name: b for b in plan_backends("cpu", FAST)}
    expected = {(b, p, d) for b in FAST for p in ("tiny", "tiny-extra") for d in plans[b].dtypes}
    assert rows == expected
    for r in doc["rows"]:
        names = {c["name"] for c in r["checks"]}
        # the output, the feature-map gradient and every parameter gradient were compared
        assert {"output", "grad input x", "grad patch_embed.weight", "grad head.fc2.bias"} <= names
        assert ("grad input extra" in names) == (r["preset"] == "tiny-extra")
        assert r["max_errors"]["error_over_bound"] <= 1.0 and r["launches"] is None and "n/a" in r["launches_note"]
    verdict = report.verdict()
    assert "VERDICT: PASS" in verdict and len(verdict.splitlines()) <= 40


@pytest.mark.parametrize("plant", ["output", "gradient", "crash"])
def test_a_planted_wrong_backend_fails_the_selftest(monkeypatch, plant):
    cpu = registry.get("cpu")
    real = cpu.slvit_exit

    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    def wrong(module, x, extra):
        if plant == "crash":
            raise RuntimeError("planted kernel crash")
        if plant == "gradient":  # forward exact, d(out)/d(x) 1% off
            return real(module, ScaleGrad.apply(x), extra)
        return real(module, x, extra) * (1 + 1e-3)

    monkeypatch.setattr(cpu, "slvit_exit", wrong)
    report = _run(configs={"tiny": TINY})
    assert not report.passed and report.exit_code == 1
    bad = report.failures()
    assert bad and {r.backend for r in bad} == {"cpu"}  # the reference rows still pass
    assert all(r.ok for r in report.rows if r.backend == "torch")
    failing = {c["name"] for r in bad for c in r.checks if not c["ok"]}
    if plant == "output":
        assert "output" in failing
    elif plant == "gradient":
        assert failing == {"grad input x"}
    else:
        assert all("planted kernel crash" in r.error for r in bad)
    verdict = report.verdict()
    assert "VERDICT: FAIL" in verdict and "FAIL cpu tiny" in verdict


def test_triton_interpreter_rows_and_emulated_launch_counts():
    plans = {b.name: b for b in plan_backends("cpu")}
    names = [n for n in ("triton", "cuda-emu") if plans[n].skipped is None]
    if not names:
        pytest.skip("neither the Triton interpreter nor the cuda-emu build is available")
    report = _run(configs={"tiny": TINY}, backends=names)
    assert report.passed, report.verdict()
    expected = {"triton": 3, "cuda-emu": 2}  # forward launches of the fused kernels
    for r in report.rows:
        assert r.launches == expected[r.backend], (r.backend, r.launches, r.launches_note)


def test_timing_case_and_row_attachment():
    case = time_case("tiny", TINY, "fp32", 2, ["torch", "cpu"], [], "cpu", repeats=2)
    assert set(case.seconds) == {"eager", "cpu"} and all(v > 0 for v in case.seconds.values())
    assert case.speedup("cpu", "eager") == pytest.approx(case.seconds["eager"] / case.seconds["cpu"])
    report = _run(configs={"tiny": TINY})
    _attach_timing(report.rows, case)
    timed = [r for r in report.rows if r.dtype == "fp32"]
    assert all(r.timing["2"]["exit_s"] > 0 for r in timed)
    cpu_row = next(r for r in timed if r.backend == "cpu")
    assert cpu_row.timing["2"]["speedup_vs_eager"] == pytest.approx(case.speedup("cpu", "eager"))
    assert validate_report(report.to_dict()) == []


def test_validate_report_catches_a_broken_document():
    report = _run(configs={"tiny": TINY})
    doc = json.loads(json.dumps(report.to_dict()))
    assert validate_report(doc) == []
    del doc["rows"][0]["max_errors"]["output"]
    doc["rows"][1]["dtype"] = "fp8"
    doc["schema"] = "other"
    problems = validate_report(doc)
    assert len(problems) == 3, problems


def test_empty_run_fails():
    report = SelftestReport("cpu", False, {}, [])
    assert not report.passed and report.exit_code == 1


def test_cli_subcommand_runs_and_returns_the_exit_code(capsys):
    from slvit_fast.selftest.cli import main

    code = main(["--device", "cpu", "--quick", "--backends", "cpu", "--presets", "inceptionv3-b1-cifar100",
                 "--no-timing"])
    out = capsys.readouterr().out
    assert code == 0 and "VERDICT: PASS - 3/3" in out  # fp32, bf16, fp16 of one preset


def test_cuda_launch_counting_path_runs_its_bookkeeping_on_cpu():
    """The CUDA launch counter's loop (every backend x dtype, errors kept per row) works on any device."""
    from slvit_fast.selftest.runner import _count_launches

    plans = plan_backends("cpu", FAST)
    counts = _count_launches(TINY, plans, "cpu")
    assert set(counts) == {(b.name, d) for b in plans for d in b.dtypes}
    assert all(n is None and "n/a" in note for n, note in counts.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_cuda_without_a_gpu_is_a_clear_error(capsys):
    from slvit_fast.selftest.cli import main

    assert main(["--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
