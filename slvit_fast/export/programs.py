"""One stage of an exported pipeline as a file: a ``torch.export`` program (``.pt2``) or ONNX (``.onnx``).

Every stage takes one tensor whose first dimension (the batch) is dynamic - after batch compaction a
stage runs on however many samples are left - and returns one or more tensors. Programs are traced
under ``torch.no_grad()``: inference graphs (on the ``cpu`` backend that is the fused inference path).

ONNX: custom ops have no ONNX form, so while ``torch.onnx.export`` runs, every SL-ViT exit runs the
reference ops (see :mod:`slvit_fast.backends`) and the graph holds standard ONNX operators only.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

FORMATS = {"onnx": ".onnx", "torch": ".pt2"}
MAX_BATCH = 1 << 16


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {sorted(FORMATS)}")
    if fmt == "onnx":
        for name in ("onnx", "onnxscript", "onnxruntime"):
            try:
                __import__(name)
            except ImportError:
                raise ImportError(f"format='onnx' needs the {name!r} package: pip install 'slvit_fast[export]' "
                                  "(onnx, onnxscript, onnxruntime)") from None
    return fmt


def save_program(module: nn.Module, example: Tensor, path_stem: str, fmt: str, num_outputs: int) -> str:
    """Export ``module(example)`` with a dynamic batch to ``path_stem + extension``; returns the file name."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    path = path_stem + FORMATS[fmt]
    module = module.eval()
    with torch.no_grad():
        if fmt == "torch":
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, path)
        else:
            names = [f"out{i}" for i in range(num_outputs)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's progress chatter
                onnx_program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                                 input_names=["x"], output_names=names, verbose=False)
            onnx_program.save(path)
    return os.path.basename(path)


def load_program(path: str, fmt: str) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """A callable ``stage(x) -> tuple of tensors`` for a file written by :func:`save_program`."""
    if fmt == "torch":
        module = torch.export.load(path).module()

        def run_torch(x: Tensor) -> tuple[Tensor, ...]:
            with torch.no_grad():
                out = module(x)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

        return run_torch
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run_onnx(x: Tensor) -> tuple[Tensor, ...]:
        outs = session.run(None, {input_name: x.detach().cpu().contiguous().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)

    return run_onnx


__all__ = ["FORMATS", "check_format", "save_program", "load_program"]
