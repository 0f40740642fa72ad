"""Deploying single exits (issue #13 item 4): ``torch.export`` programs load in a fresh process after
``import slvit_fast``; ``torch.onnx.export(..., dynamo=True)`` gives standard ONNX that ONNX Runtime runs,
equal to the reference, whatever the exit's backend."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from slvit_fast import CNNExit, CNNExitConfig, SLViTExit, backends

from kernel_cases import awkward_config, randomize_

FUSED = ("cpu", "cuda-emu", "triton")
STATUS = backends.status(torch.empty(1, 1, 1, 1))


def _exit(backend: str) -> SLViTExit:
    cfg = awkward_config("N25-h1", in_channels=3, feature_size=(8, 8))
    m = randomize_(SLViTExit(cfg, backend=backend)).eval()
    return m


def _needs(backend: str) -> None:
    if STATUS.get(backend) != "available":
        pytest.skip(f"backend {backend!r}: {STATUS.get(backend)}")


def test_saved_programs_load_in_a_fresh_process_that_only_imports_slvit_fast(tmp_path):
    """Each fused backend's exit is saved with its custom op; a new process that did nothing but
    ``import slvit_fast`` loads and runs it (the ops, with fake kernels, exist from import on)."""
    available = [b for b in FUSED if STATUS.get(b) == "available"]
    if not available:
        pytest.skip(f"no fused backend available: {STATUS}")
    x = torch.randn(3, 3, 8, 8)
    expected = {}
    for b in available:
        m = _exit(b)
        with torch.no_grad():
            program = torch.export.export(m, (x,))
            expected[b] = m(x)
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any(o.startswith("slvit_fast.") for o in ops), (b, ops)  # the fused op is in the program
        torch.export.save(program, str(tmp_path / f"{b}.pt2"))
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        import slvit_fast  # the only import of the package: it must register every op
        x = torch.load({str(tmp_path / 'x.pt')!r})
        for b in {available!r}:
            out = torch.export.load({str(tmp_path)!r} + "/" + b + ".pt2").module()(x)
            torch.save(out, {str(tmp_path)!r} + "/" + b + ".out.pt")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for b in available:
        torch.testing.assert_close(torch.load(tmp_path / f"{b}.out.pt"), expected[b], rtol=1e-6, atol=1e-6)


def _onnx_session(module: torch.nn.Module, x: torch.Tensor, path):
    """Export with a dynamic batch, check the graph is standard ONNX, open it in ONNX Runtime."""
    # here, not at module level: the torch.export test above must run without the ONNX packages
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    program.save(str(path))
    model = onnx.load(str(path))
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    ops = {n.op_type for n in model.graph.node}
    assert not any("slvit" in o for o in ops), ops
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda-emu", "triton"])
def test_onnx_export_of_slvit_exit_runs_in_onnxruntime(tmp_path, backend):
    _needs(backend)
    m = _exit(backend)
    ref = copy.deepcopy(m)
    ref.backend = "torch"
    x = torch.randn(2, 3, 8, 8)
    session = _onnx_session(m, x, tmp_path / "exit.onnx")
    assert m.active_backend(x) == backend  # outside the export nothing changed
    for batch in (1, 2, 5):  # the batch is dynamic
        xb = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(_run(session, xb), ref(xb), rtol=1e-5, atol=1e-5)


def test_onnx_export_of_cnn_exit_runs_in_onnxruntime(tmp_path):
    cfg = CNNExitConfig(in_channels=3, feature_size=(8, 8), filters=5, head_hidden=12, num_outputs=4)
    m = CNNExit(cfg).eval()
    x = torch.randn(3, 3, 8, 8)
    session = _onnx_session(m, x, tmp_path / "cnn.onnx")
    with torch.no_grad():
        torch.testing.assert_close(_run(session, x), m(x), rtol=1e-5, atol=1e-5)
