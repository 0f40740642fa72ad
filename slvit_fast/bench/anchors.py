"""Speed anchors: the strongest alternatives a user could pick instead of our kernels, built from the reference.

* ``compile``       - ``torch.compile`` (inductor, default mode) of :func:`slvit_fast.reference.slvit_exit`;
* ``max-autotune``  - the same with ``mode="max-autotune"`` (inductor benchmarks GEMM choices on first call);
* ``reduce-overhead`` - ``mode="reduce-overhead"`` (CUDA graphs; meaningful on CUDA only);
* ``onnxruntime``   - the reference exit exported with ``torch.onnx.export(..., dynamo=True)`` at the
  benchmark's shapes and run by ONNX Runtime's CPUExecutionProvider with torch's thread count
  (default session options otherwise: what a user gets).

Every builder returns a zero-argument callable producing the exit output as a torch tensor, so the
anchors go through the same agreement check and the same interleaved rounds as everything else.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from typing import Callable

import torch

from .. import reference

COMPILE_MODES = {"compile": None, "max-autotune": "max-autotune", "reduce-overhead": "reduce-overhead"}
# The anchors that take long to set up (autotuning, export); `slvit-fast bench` can skip them.
SLOW_ANCHORS = ("max-autotune", "onnxruntime")


def compiled_reference(module: torch.nn.Module, x: torch.Tensor, extra: torch.Tensor | None,
                       mode: str | None) -> Callable[[], torch.Tensor]:
    """``torch.compile(reference.slvit_exit, mode=mode)`` bound to ``module``'s parameters and the inputs.

    Every such function shares one code object, so dynamo keeps all their compilations in one cache
    with a recompile limit (8): callers building many (the benchmark jobs, the self-test cases) call
    ``torch._dynamo.reset()`` between cases, or later compilations would silently run eager.
    """
    params = dict(module.named_parameters())
    cfg = module.config
    training = module.training
    # dynamic=False: specialized to these shapes, the strongest anchor (no dynamic-batch kernels)
    fn = torch.compile(lambda x_, e_: reference.slvit_exit(x_, params, cfg, e_, training=training), mode=mode,
                       dynamic=False)
    if mode == "reduce-overhead":  # CUDA graphs: tell the graph tree each call is a new step
        return lambda: (torch.compiler.cudagraph_mark_step_begin(), fn(x, extra))[1]
    return lambda: fn(x, extra)


def onnxruntime_unavailable_reason() -> str | None:
    for name in ("onnxruntime", "onnxscript", "onnx"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (pip install onnx onnxscript onnxruntime, or the [export] extra)"
    return None


class _ReferenceExit(torch.nn.Module):
    """The reference exit function as a module, so ``torch.onnx.export`` sees the parameters as weights."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.exit = module
        self.config = module.config

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return reference.slvit_exit(x, dict(self.exit.named_parameters()), self.config, extra, training=False)


def onnx_model_bytes(module: torch.nn.Module, x: torch.Tensor, extra: torch.Tensor | None) -> bytes:
    """The reference exit (eval mode) exported to ONNX at the shapes of ``x``/``extra`` (static shapes)."""
    wrapper = _ReferenceExit(module).eval()
    args = (x,) if extra is None else (x, extra)
    # The dynamo exporter reports its progress on stdout and warns about opset choices: keep the table clean.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, args, dynamo=True, verbose=False)
    return program.model_proto.SerializeToString()


def onnxruntime_session(model: bytes, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # ORT's worker threads spin-wait after each run by default; in interleaved rounds on a small machine
    # that spinning steals the cores from whichever implementation is timed next, so it is turned off.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def onnxruntime_exit(module: torch.nn.Module, x: torch.Tensor, extra: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    """A callable running the exported reference exit in ONNX Runtime on (copies of) ``x``/``extra``."""
    reason = onnxruntime_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    if x.device.type != "cpu":
        raise RuntimeError(f"the ONNX Runtime anchor uses the CPUExecutionProvider; inputs are on {x.device}")
    session = onnxruntime_session(onnx_model_bytes(module, x, extra))
    names = [i.name for i in session.get_inputs()]
    arrays = [x.detach().contiguous().numpy()] + ([] if extra is None else [extra.detach().contiguous().numpy()])
    if len(names) != len(arrays):
        raise RuntimeError(f"exported ONNX model takes inputs {names}, expected {len(arrays)}")
    feeds = dict(zip(names, arrays))  # numpy views of the torch inputs: no copy per call
    return lambda: torch.from_numpy(session.run(None, feeds)[0])
