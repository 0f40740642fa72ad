"""Exporting a :class:`~slvit_fast.MultiExitNetwork` with its policy, and running the export.

:func:`export_early_exit` writes, into one folder, one program per stage - each backbone segment up to
an exit's compaction point, each exit, and the tail of the backbone - plus ``policy.json`` and
``manifest.json`` (the order of the stages). :class:`EarlyExitRunner` runs them the way
:meth:`MultiExitNetwork.early_exit <slvit_fast.MultiExitNetwork.early_exit>` runs the network: after
each cut only the samples that have not exited go on (real batch compaction, any batch size), and
the answers come back in input order with the exit index of each sample. Runners need no Python
model code: ONNX Runtime for ``format="onnx"``, ``torch.export.load`` for ``format="torch"`` (custom
ops of slvit_fast are registered by ``import slvit_fast``).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from ..exit_result import EarlyExitResult
from ..multi_exit import MultiExitNetwork
from ..policies import Policy
from .policy_json import policy_from_dict, policy_to_dict
from .programs import check_format, load_program, save_program
from .segments import check_split, split_backbone

MANIFEST = "manifest.json"
POLICY = "policy.json"
FORMAT = "slvit_fast.early_exit/1"


def _check_exportable(net: Any, policy: Any, example_input: Any) -> None:
    if not isinstance(net, MultiExitNetwork):
        raise TypeError(f"net must be a slvit_fast.MultiExitNetwork, got {type(net).__name__}")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a slvit_fast.policies.Policy, got {type(policy).__name__}")
    policy.check(net.num_exits)
    if not isinstance(example_input, Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise TypeError("example_input must be one tensor with a batch dimension (backbones taking several "
                        f"inputs cannot be exported yet), got {type(example_input).__name__}")
    for i, (path, extra) in enumerate(zip(net.exit_paths, net.extra_paths)):
        cfg = getattr(net.exits[list(net.exits)[i]], "config", None)
        if extra is not None or getattr(cfg, "extra_dim", 0):
            raise ValueError(f"exit {i} at {path!r} takes an extra input; exporting exits with extra inputs "
                             "(audiovisual exits) is not supported")
    for m in net.backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise RuntimeError("export_early_exit needs the backbone in eval mode (BatchNorm in training mode); "
                               "call net.eval()")


def _plan(net: MultiExitNetwork) -> list[dict[str, Any]]:
    """One entry per compaction point, in forward order: its exits and the module outputs they read."""
    stages: list[dict[str, Any]] = []
    for i, (module_path, cut) in enumerate(zip(net.exit_modules, net.compaction_points)):
        if not stages or stages[-1]["cut"] != cut:
            if any(s["cut"] == cut for s in stages):
                raise ValueError(f"exits compacted at {cut!r} are not consecutive; cannot export this network")
            stages.append({"cut": cut, "captures": [], "exits": []})
        stage = stages[-1]
        if module_path == cut:
            source = 0
        else:
            if module_path not in stage["captures"]:
                stage["captures"].append(module_path)
            source = 1 + stage["captures"].index(module_path)
        stage["exits"].append({"index": i, "path": net.exit_paths[i], "input": source})
    return stages


def export_early_exit(net: MultiExitNetwork, policy: Policy, example_input: Tensor, out_dir: str,
                      format: str = "onnx") -> str:
    """Write ``net``'s early-exit pipeline and ``policy`` to ``out_dir``; returns the manifest's path.

    ``example_input``: a backbone input (B, ...) of the size the programs will see (any batch size at
    run time). ``format``: ``"onnx"`` (standard ONNX operators, for ONNX Runtime) or ``"torch"``
    (``torch.export`` programs, ``.pt2``). Backbones are cut at the exits' compaction points (see
    :mod:`slvit_fast.export.segments`); a backbone that cannot be cut there, exits with extra inputs,
    and policies that are not data (a Python criterion, a deadline) are errors naming the reason.
    """
    check_format(format)
    _check_exportable(net, policy, example_input)
    policy_data = policy_to_dict(policy)
    plan = _plan(net)
    cuts = [s["cut"] for s in plan]
    segments, tail = split_backbone(net.backbone, cuts, [s["captures"] for s in plan])
    example = example_input.detach()
    if example.shape[0] == 1:  # a batch of 1 would be specialized away; the batch stays dynamic
        example = torch.cat([example, example])
    check_split(net.backbone, segments, tail, cuts, example)

    os.makedirs(out_dir, exist_ok=True)
    exits = list(net.exits.values())
    stages, x = [], example
    with torch.no_grad():
        for k, (step, segment) in enumerate(zip(plan, segments)):
            outs = segment(x)
            entry = {"cut": step["cut"], "outputs": len(outs), "exits": [],
                     "program": save_program(segment, x, os.path.join(out_dir, f"segment_{k}"), format, len(outs))}
            for e in step["exits"]:
                module = copy.deepcopy(exits[e["index"]]).eval()
                stem = os.path.join(out_dir, f"exit_{e['index']}")
                entry["exits"].append({**e, "program": save_program(module, outs[e["input"]], stem, format, 1)})
            stages.append(entry)
            x = outs[0]
        tail_file = save_program(tail, x, os.path.join(out_dir, "tail"), format, 1)
        final = tail(x)  # the answer's per-sample shape and dtype, for empty batches at run time
    with open(os.path.join(out_dir, POLICY), "w") as f:
        json.dump(policy_data, f, indent=1)
    manifest = {"format": FORMAT, "program_format": format, "num_exits": net.num_exits,
                "exit_paths": list(net.exit_paths), "stages": stages, "tail": tail_file, "policy": POLICY,
                "input": {"sample_shape": list(example.shape[1:]), "dtype": _dtype_name(example.dtype)},
                "output": {"sample_shape": list(final.shape[1:]), "dtype": _dtype_name(final.dtype)}}
    path = os.path.join(out_dir, MANIFEST)
    # the manifest is written last and renamed into place: a folder whose export was interrupted has no
    # manifest (or the previous complete one), never a half-written one
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, path)
    return path


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class EarlyExitRunner:
    """Runs a folder written by :func:`export_early_exit`: ``runner(x)`` -> :class:`~slvit_fast.EarlyExitResult`.

    Equal to ``net.early_exit(x, policy)`` on the same inputs (up to the rounding of the program format):
    the same exits answer the same samples. ``policy`` overrides the exported one (e.g. other thresholds).
    """

    def __init__(self, out_dir: str, policy: Policy | None = None):
        path = os.path.join(out_dir, MANIFEST)
        try:
            with open(path) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{out_dir!r} holds no {MANIFEST}: not a folder written by export_early_exit") \
                from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown manifest format {manifest.get('format')!r} (expected {FORMAT!r})")
        self.out_dir = out_dir
        self.manifest = manifest
        self.format = manifest["program_format"]
        self.num_exits = int(manifest["num_exits"])
        if policy is None:
            with open(os.path.join(out_dir, manifest["policy"])) as f:
                policy = policy_from_dict(json.load(f))
        policy.check(self.num_exits)
        self.policy = policy
        load = lambda name: load_program(os.path.join(out_dir, name), self.format)  # noqa: E731
        self._stages = [(load(s["program"]), [(e["index"], e["input"], load(e["program"])) for e in s["exits"]])
                        for s in manifest["stages"]]
        self._tail = load(manifest["tail"])

    def __call__(self, x: Tensor) -> EarlyExitResult:
        return self.run(x)

    def run(self, x: Tensor) -> EarlyExitResult:
        """Early exit on the batch ``x``: segments, exits and policy stage by stage, with compaction."""
        self._check_input(x)
        B = int(x.shape[0])
        n = self.num_exits
        if B == 0:
            return self._empty_result(x.device)
        book = _Book(B, x.device)
        state = self.policy.start(B, n, x.device)
        evaluated = [0] * (n + 1)
        feat = x
        for segment, exits in self._stages:
            outs = segment(feat)
            for i, source, program in exits:
                idx = book.alive.nonzero().squeeze(1)
                f = outs[source] if idx.numel() == book.alive.numel() else outs[source].index_select(0, idx)
                out = program(f)[0]
                evaluated[i] = idx.numel()
                orig = book.rows.index_select(0, idx)
                decide = self.policy.decide(state, i, out, orig)
                book.record(i, orig[decide], out[decide])
                book.alive[idx[decide]] = False
                if not book.alive.any():
                    return book.result(n, evaluated)
            feat = book.compact(outs[0])
        final = self._tail(feat)[0]
        evaluated[n] = book.rows.numel()
        book.record(n, book.rows, final)
        return book.result(n, evaluated)


    def _check_input(self, x: Tensor) -> None:
        """The programs are specialized to the exported sample shape and dtype: say so, not a runtime's error."""
        want = self.manifest.get("input")
        if not isinstance(x, Tensor):
            raise TypeError(f"EarlyExitRunner: expected one tensor (batch first), got {type(x).__name__}")
        if not want:
            return
        shape = tuple(want["sample_shape"])
        if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"EarlyExitRunner: input of shape {tuple(x.shape)}, but {self.out_dir!r} was exported "
                             f"for samples of shape {shape} (batch dimension first: (B, {', '.join(map(str, shape))}))")
        if _dtype_name(x.dtype) != want["dtype"]:
            raise TypeError(f"EarlyExitRunner: input of dtype {_dtype_name(x.dtype)}, but {self.out_dir!r} was "
                            f"exported for {want['dtype']}; convert with x.to(torch.{want['dtype']})")

    def _empty_result(self, device: torch.device) -> EarlyExitResult:
        """A (0, ...) answer for an empty batch, like ``net.early_exit(x[:0], policy)``."""
        out = self.manifest.get("output")
        if not out:  # written before the manifest recorded the output's shape
            raise ValueError(f"EarlyExitRunner: empty batch, and {self.out_dir!r} (exported by an older "
                             f"slvit_fast) does not record the output shape; export it again")
        outputs = torch.empty((0, *out["sample_shape"]), dtype=getattr(torch, out["dtype"]), device=device)
        zeros = [0] * (self.num_exits + 1)
        return EarlyExitResult(outputs, torch.empty(0, dtype=torch.long, device=device), zeros, list(zeros))


class _Book:
    """Which original sample each running row is, which are still running, and the answers so far."""

    def __init__(self, B: int, device: torch.device):
        self.B = B
        self.rows = torch.arange(B, device=device)
        self.alive = torch.ones(B, dtype=torch.bool, device=device)
        self.outputs: Tensor | None = None
        self.exit_index = torch.full((B,), -1, dtype=torch.long, device=device)

    def record(self, i: int, orig: Tensor, out: Tensor) -> None:
        if orig.numel() == 0:
            return
        orig = orig.to(self.exit_index.device)
        if self.outputs is None:
            self.outputs = torch.full((self.B, *out.shape[1:]), float("nan"), dtype=out.dtype, device=out.device)
        self.outputs[orig.to(out.device)] = out.to(self.outputs.dtype)
        self.exit_index[orig] = i

    def compact(self, features: Tensor) -> Tensor:
        if bool(self.alive.all()):
            return features
        keep = self.alive.nonzero().squeeze(1)
        self.rows = self.rows.index_select(0, keep)
        self.alive = self.alive.index_select(0, keep)
        return features.index_select(0, keep.to(features.device))

    def result(self, num_exits: int, evaluated: list[int]) -> EarlyExitResult:
        counts = torch.bincount(self.exit_index, minlength=num_exits + 1).tolist()
        return EarlyExitResult(self.outputs, self.exit_index, counts, evaluated)


__all__ = ["export_early_exit", "EarlyExitRunner"]
