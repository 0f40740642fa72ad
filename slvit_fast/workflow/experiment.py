"""The real-data pipeline behind ``slvit-fast train``, ``slvit-fast evaluate`` and ``slvit-fast demo``.

``run_experiment(RunSpec(...))``:

1. loads the data (:mod:`.data`: ImageFolder or ``.npz``), splits it train/val/test with a seed and sets
   size and normalisation;
2. builds the backbone (:func:`slvit_fast.presets.build_backbone`: random, a file or torchvision
   weights; a classifier of another size is replaced) and, with ``train_backbone_epochs``, fine-tunes
   it whole (:mod:`.finetune`); a backbone whose classifier was never trained gets a warning;
3. for each exit type (``slvit``, ``cnn``): attaches exits at the preset branches or ``exit_paths``
   (sized by ``for_feature_map``), trains them classifier-wise with :func:`slvit_fast.training.train_exits`
   (frozen backbone, feature cache in ``OUT/cache``, shared by the exit types: same backbone, data and
   branch points), calibrates MaxSoftmax thresholds on the
   validation split (``budget`` FLOPs per sample with :func:`~slvit_fast.calibration.calibrate_budget`,
   or exit ``fractions`` with :func:`~slvit_fast.calibration.calibrate_fractions`), evaluates on the
   test split (:mod:`.evaluation`: real early exit, FLOPs, wall-clock) and writes the run directory
   (:mod:`.rundir`);
4. with several exit types (the demo), each gets ``OUT/<type>/`` and a joint ``OUT/accuracy_flops.png``.

Everything a user can get wrong (options, data, weights, exit paths, the number of ``fractions``) is
checked before the output folder is touched. Then the folder is locked (a second run into it fails at
once) and the run is written into a staging folder inside it, then published (``rundir.publish``): the
commit point is one atomic record, the files are moved in after it, each run directory's new ``run.json``
last, pinning the other files by sha256 (see :mod:`.rundir`). A run that fails or is killed before the
commit leaves the previous run as it was; one killed after it is finished by the next ``train`` or
``evaluate`` of the folder; ``evaluate`` never serves one run's backbone with another run's exits.

``evaluate_run(run_dir, data)`` checks those hashes, rebuilds the network from ``run.json`` and
re-evaluates the same test split (warning, and ``data_matches_run: false`` in the report, when the data
are not the ones the run was trained on: the test split would then not be the held-out one). Every phase logs one line to the ``slvit_fast.workflow`` logger (the exit-training epochs log to
``slvit_fast.training``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import accounting, presets
from ..analysis import plot_accuracy_flops
from ..backbones.weights import WEIGHT_SUFFIXES
from ..calibration import calibrate_budget, calibrate_fractions
from ..checkpoint import atomic_write
from ..training import train_exits
from . import data as D
from . import rundir as R
from .errors import UsageError
from .evaluation import evaluate
from .finetune import finetune_backbone
from .report import fmt_count, format_report

log = logging.getLogger("slvit_fast.workflow")

__all__ = ["RunSpec", "run_experiment", "evaluate_run", "DEFAULT_BUDGET_FRACTION", "is_torchvision_name"]

# Without --budget or --fractions: the most accurate thresholds spending at most this fraction of the
# plain backbone's FLOPs per sample (calibrate_budget on the validation split).
DEFAULT_BUDGET_FRACTION = 0.5
EXIT_TYPES = ("slvit", "cnn")


@dataclass
class RunSpec:
    """Everything ``slvit-fast train`` takes (see ``slvit-fast train --help``)."""

    data: str
    backbone: str
    out: str
    weights: str | None = None
    exit_paths: list[str] | None = None
    exit_types: Sequence[str] = ("slvit",)
    input_size: int | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    train_backbone_epochs: int = 0
    backbone_lr: float = 1e-3
    budget: float | None = None
    fractions: list[float] | None = None
    early_stopping_patience: int | None = 5
    timing_repeats: int = 3
    exit_backend: str = "auto"
    plot_title: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in run.json as is


def is_torchvision_name(weights: Any) -> bool:
    """A weights string that is not a file: torchvision's "IMAGENET1K_V1", "DEFAULT", ..."""
    if not isinstance(weights, str):
        return False
    return not (Path(weights).exists() or weights.lower().endswith(WEIGHT_SUFFIXES) or "/" in weights
                or os.sep in weights)


def _check(spec: RunSpec) -> str:
    """Validate what a user can get wrong before any work; returns the canonical backbone name."""
    try:
        name = presets.canonical_name(spec.backbone)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if name == "audiocsrnet":
        raise UsageError("audiocsrnet is a regression backbone with audio input; the image workflow needs a classifier")
    if spec.budget is not None and spec.fractions is not None:
        raise UsageError("give --budget or --fractions, not both")
    if spec.budget is not None and not spec.budget > 0:
        raise UsageError(f"--budget must be a positive number of FLOPs per sample, got {spec.budget}")
    for t in spec.exit_types:
        if t not in EXIT_TYPES:
            raise UsageError(f"exit type must be one of {EXIT_TYPES}, got {t!r}")
    for what, v in (("epochs", spec.epochs), ("batch size", spec.batch_size)):
        if v < 1:
            raise UsageError(f"{what} must be >= 1, got {v}")
    if spec.train_backbone_epochs < 0:
        raise UsageError(f"--train-backbone-epochs must be >= 0, got {spec.train_backbone_epochs}")
    if spec.input_size is not None and spec.input_size < 8:
        raise UsageError(f"--input-size must be at least 8 pixels, got {spec.input_size}")
    if spec.weights is not None and not is_torchvision_name(spec.weights) and not Path(spec.weights).is_file():
        raise UsageError(f"weights file {spec.weights!r} does not exist")
    if spec.exit_paths is not None and not [p for p in spec.exit_paths if str(p).strip()]:
        raise UsageError("--exits is empty: give module paths such as layer1,layer2, or leave it out for the "
                         "preset branches")
    if spec.fractions is not None and (any(not 0 <= f <= 1 for f in spec.fractions) or sum(spec.fractions) > 1 + 1e-9):
        raise UsageError(f"--fractions must be in [0, 1] and sum to at most 1, got {spec.fractions}")
    return name


def _exit_names(name: str, exit_paths: Sequence[str] | None) -> list[str]:
    """The early exits ``presets.build`` will attach (same rule): the module paths, or the preset branches."""
    if exit_paths is not None:
        return [str(p).strip() for p in exit_paths if str(p).strip()]
    return [b.name for b in presets.BRANCHES[name]]


def _check_fractions(spec: RunSpec, name: str) -> None:
    """``--fractions`` needs one value per early exit (or one per output including the final one, summing
    to 1, as :func:`~slvit_fast.calibration.calibrate_fractions` takes): checked before any training."""
    if spec.fractions is None:
        return
    exits = _exit_names(name, spec.exit_paths)
    n, got = len(exits), len(spec.fractions)
    if got == n or (got == n + 1 and abs(sum(spec.fractions) - 1) <= 1e-6):
        return
    where = "--exits" if spec.exit_paths is not None else f"the {name} preset"
    msg = (f"--fractions has {got} value{'s' if got != 1 else ''} but {where} gives {n} early exit{'s' if n != 1 else ''} "
           f"({', '.join(exits)}): give {n}, one per early exit (the remaining samples go to the final output)")
    if got == n + 1:
        msg += (f"; {got} values are read as one per output including the final one only when they sum to 1 "
                f"(these sum to {sum(spec.fractions):g})")
    raise UsageError(msg)


def _check_budget(spec: RunSpec, name: str, num_outputs: int, size: int, backbone: torch.nn.Module) -> None:
    """``--budget`` below what a sample leaving at the first exit costs fits no policy at all: said before any
    training (review 10: found after training and calibration). Above it, whether a calibrated policy fits
    depends on the validation split, so that is still found at calibration."""
    if spec.budget is None:
        return
    for exit_type in spec.exit_types:
        net = presets.build(name, exit_type=exit_type, num_outputs=num_outputs, weights=backbone, input_size=size,
                            exit_paths=spec.exit_paths, exit_backend=spec.exit_backend)
        summary = accounting.summary(net, (3, size, size))
        first = float(summary.rows[0].cost_flops)
        if spec.budget < first:
            raise UsageError(f"--budget {fmt_count(spec.budget)} FLOPs per sample is below the cost of leaving at the "
                             f"first exit ({summary.rows[0].name}: {fmt_count(first)} FLOPs with {exit_type} exits), so "
                             f"no policy fits it; the backbone alone costs {fmt_count(float(summary.backbone_flops))}")


def _data_key(data_fp: str, spec: RunSpec, size: int, mean: Sequence[float], std: Sequence[float]) -> str:
    """The feature cache's name for this run's data (``train_exits(cache_key=...)``): the data's content
    plus everything that turns it into the backbone's inputs and picks the splits."""
    key = {"data": data_fp, "val_fraction": spec.val_fraction, "test_fraction": spec.test_fraction,
           "seed": spec.seed, "input_size": size, "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    return "workflow-data:" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _save_backbone(backbone: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def _calibrate(net, val_loader, spec: RunSpec, backbone_flops: float):
    """(policy, calibration record for report.json) on the validation split."""
    if spec.fractions is not None:
        try:
            cal = calibrate_fractions(net, val_loader, spec.fractions)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return cal.policy(), {"method": "fractions", "target_fractions": cal.target_fractions,
                              "val_exit_fractions": cal.exit_fractions, "val_accuracy": cal.accuracy,
                              "val_mean_flops": cal.expected_flops}
    budget = spec.budget if spec.budget is not None else DEFAULT_BUDGET_FRACTION * backbone_flops
    cal = calibrate_budget(net, val_loader, budget)
    best = cal.best
    if best is None:
        cheapest = min(cal.candidates, key=lambda c: c.expected_flops)
        if spec.budget is not None:
            raise UsageError(f"--budget {fmt_count(budget)}FLOPs per sample is below every calibrated policy "
                             f"(the cheapest needs {fmt_count(cheapest.expected_flops)}FLOPs on the validation split; "
                             f"the backbone alone {fmt_count(backbone_flops)})")
        log.warning("no calibrated policy fits the default budget of %s FLOPs per sample (%.0f%% of the backbone); "
                    "using the cheapest one (%s FLOPs)", fmt_count(budget), 100 * DEFAULT_BUDGET_FRACTION,
                    fmt_count(cheapest.expected_flops))
        best = cheapest
    return best.policy(), {"method": "budget", "budget_flops": budget, "default_budget": spec.budget is None,
                           "val_exit_fractions": best.exit_fractions, "val_accuracy": best.accuracy,
                           "val_mean_flops": best.expected_flops}


def _plot(reports: dict[str, dict], path: Path, title: str) -> Path:
    label = {"slvit": "SL-ViT exits", "cnn": "CNN exits"}
    curves, exits = {}, {}
    final = None
    for kind, rep in reports.items():
        name = label.get(kind, kind)
        curves[name] = [(p["mean_flops"], p["accuracy"]) for p in rep["curve"]]
        exits[name] = [(r["total_flops"], r["accuracy"]) for r in rep["exits"][:-1]]
        final = rep["exits"][-1]
    return plot_accuracy_flops(curves, path, backbone=(final["total_flops"], final["accuracy"]), exits=exits,
                               title=title)


@dataclass
class _Weights:
    """The backbone weights a run.json references (``saved``: ``backbone.safetensors`` in OUT) and their
    sha256 (None for a torchvision weights name: torchvision checks those itself)."""

    ref: str | None
    saved: bool
    sha256: str | None


def _sha256_logged(path: str | os.PathLike) -> str:
    t0 = time.perf_counter()
    sha = R.file_sha256(path)
    if time.perf_counter() - t0 > 2.0:
        log.info("hashed %s (sha256, pinned in run.json) in %.1f s", path, time.perf_counter() - t0)
    return sha


def _data_fingerprint_logged(images) -> str:
    """:func:`.rundir.dataset_fingerprint` (reads every image file of a folder: logged when that is slow)."""
    t0 = time.perf_counter()
    fp = R.dataset_fingerprint(images)
    if time.perf_counter() - t0 > 2.0:
        log.info("fingerprinted the data's content (sha256 of every image and label) in %.1f s",
                 time.perf_counter() - t0)
    return fp


def _weights_for(spec: RunSpec, out: Path, backbone, notes: list[str], finetuned: bool,
                 given_sha: str | None) -> _Weights:
    """The user's file/name when it rebuilds this backbone exactly, else ``backbone.safetensors`` written to ``out``."""
    if spec.weights is not None and not finetuned and not any("replaced" in n for n in notes):
        if is_torchvision_name(spec.weights):
            return _Weights(spec.weights, False, None)
        return _Weights(str(Path(spec.weights).resolve()), False, given_sha)
    _save_backbone(backbone, out / R.BACKBONE_FILE)
    return _Weights(R.BACKBONE_FILE, True, _sha256_logged(out / R.BACKBONE_FILE))


def _pinned_weights(w: _Weights, out: Path, backbone, final_out: Path) -> _Weights:
    """``w``, checked just before a run.json pins it: the user's weights file must still be the one the
    backbone was built from (hashed before it was read); if it was replaced during the run, the backbone
    the exits were trained on is saved to the run instead."""
    if w.saved or w.sha256 is None:
        return w
    if Path(w.ref).is_file() and _sha256_logged(w.ref) == w.sha256:
        return w
    log.warning("%s changed while this run was training: the backbone the exits were trained on is saved to %s "
                "and run.json references that instead", w.ref, final_out / R.BACKBONE_FILE)
    _save_backbone(backbone, out / R.BACKBONE_FILE)
    return _Weights(R.BACKBONE_FILE, True, _sha256_logged(out / R.BACKBONE_FILE))


def _user_backbone(name: str, num_outputs: int, weights: Any, size: int, exit_paths: Sequence[str] | None):
    """``presets.build_backbone`` with the user's mistakes as :class:`UsageError`: weights that are not a
    state_dict of this backbone or an unknown torchvision name, an input size the backbone cannot take,
    exit paths that are not (B, C, H, W) feature maps of it."""
    from ..shape_probe import feature_shapes, probe

    try:
        backbone, notes = presets.build_backbone(name, num_outputs, weights, size)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    try:
        probe(backbone, [(1, 3, size, size)], [], stop_early=False)  # fake tensors: shapes only
    except Exception as e:  # a conv or pool larger than its input, typically
        raise UsageError(f"--input-size {size} does not fit {name} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if exit_paths:
        try:
            feature_shapes(backbone, size, list(exit_paths))
        except ValueError as e:
            raise UsageError(f"--exits: {str(e).splitlines()[0]}") from None
    return backbone, notes


def _check_finetune_batches(spec: RunSpec, backbone: torch.nn.Module, n_train: int) -> None:
    """finetune_backbone's refusal of all-1-sample batches for a BatchNorm backbone, made before OUT is touched
    (there it would come after the lock had already deleted the previous run.json)."""
    if not spec.train_backbone_epochs or not (spec.batch_size == 1 or n_train == 1):
        return
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        raise UsageError(f"fine-tuning the backbone (--train-backbone-epochs) needs training batches of at least 2 "
                         f"samples: its BatchNorm layers cannot train on one sample, and with --batch-size "
                         f"{spec.batch_size} and {n_train} training sample(s) every batch has one; use --batch-size 2 "
                         f"or more (and at least 2 training samples)")


def run_experiment(spec: RunSpec) -> dict[str, dict[str, Any]]:
    """Train, calibrate, evaluate and write run directories; returns ``{exit type: report}`` (module docstring)."""
    name = _check(spec)
    t_start = time.perf_counter()
    torch.manual_seed(spec.seed)
    out = Path(spec.out)
    # a run killed while publishing into OUT (or into the folder of --weights) is that folder's run: in place
    # before --weights is read
    R.roll_forward(out)
    if spec.weights is not None and Path(spec.weights).is_file():
        R.roll_forward(Path(spec.weights).parent)
    images = D.load_images(spec.data)
    size = int(spec.input_size or presets.DEFAULT_INPUT[name][-1])
    K = images.num_classes
    weights_file = spec.weights is not None and not is_torchvision_name(spec.weights)
    given_sha = _sha256_logged(spec.weights) if weights_file else None  # before it is read: see _pinned_weights
    t0 = time.perf_counter()
    backbone, notes = _user_backbone(name, K, spec.weights, size, spec.exit_paths)  # user errors before any work
    build_seconds = time.perf_counter() - t0
    _check_fractions(spec, name)
    _check_budget(spec, name, K, size, backbone)
    pretrained = is_torchvision_name(spec.weights)
    prep = D.prepare(images, size, spec.val_fraction, spec.test_fraction, spec.seed,
                     *((D.IMAGENET_MEAN, D.IMAGENET_STD) if pretrained else (None, None)))
    _check_finetune_batches(spec, backbone, len(prep.splits["train"]))
    t0 = time.perf_counter()
    if D.check_decodes(images, prep.splits["val"] + prep.splits["test"]):
        log.info("validation and test images decode (%d files, %.1f s)", len(prep.splits["val"]) + len(prep.splits["test"]),
                 time.perf_counter() - t0)
    data_fp = _data_fingerprint_logged(images)
    run_dirs = {t: (out if len(spec.exit_types) == 1 else out / t) for t in spec.exit_types}
    # Everything the user can get wrong is checked: from here on OUT is written, by this run only.
    # The run is written into a staging folder and published at the end (rundir.publish): a run that fails or
    # is killed before that leaves the previous run in OUT as it was.
    with contextlib.ExitStack() as locks:
        locks.enter_context(R.locked_out(out))
        for t, d in run_dirs.items():  # per-type folders too: `train --out OUT/slvit` must not write into a
            if d != out:               # folder a demo run into OUT is writing, nor the other way round
                locks.enter_context(R.locked_out(d, f"the {t} exits' folder"))
                R.remove_leftovers(d)  # of a killed `train --out OUT/<type>`
        stage = R.stage_folder(out)
        try:
            reports = _train_and_write(spec, name, stage, run_dirs, out, images, prep, backbone, notes,
                                                build_seconds, given_sha, data_fp)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        # not removed if this fails part way: past publish's commit point the staged files are the run, and the
        # next train or evaluate moves the rest in
        R.publish(stage, out, list(run_dirs.values()))
    for exit_type, run_dir in run_dirs.items():
        if len(spec.exit_types) == 1:
            print(format_report(reports[exit_type], f"{name} with {exit_type} exits, test split "
                                                    f"({reports[exit_type]['test_samples']} samples):"), flush=True)
            print(f"wrote {run_dir}/{{{R.RUN_FILE}, {R.EXITS_FILE}, {R.POLICY_FILE}, {R.REPORT_FILE}}} and "
                  f"{run_dir / R.PLOT_FILE}", flush=True)
    log.info("done in %.1f s", time.perf_counter() - t_start)
    return reports


def _train_and_write(spec: RunSpec, name: str, out: Path, final_dirs: dict[str, Path], final_out: Path, images,
                     prep, backbone, notes: list[str], build_seconds: float, given_sha: str | None,
                     data_fp: str) -> dict[str, dict[str, Any]]:
    """``run_experiment`` once the arguments are checked and OUT is locked: everything is written under
    ``out``, the staging folder laid out like ``final_out`` (the feature cache stays in ``final_out``)."""
    run_dirs = {t: out / d.relative_to(final_out) for t, d in final_dirs.items()}
    size, K = prep.input_size, images.num_classes
    n_split = {k: len(v) for k, v in prep.splits.items()}
    log.info("data: %s; split %d train / %d val / %d test (seed %d); input 3x%dx%d; content sha256 %s",
             images.describe(), n_split["train"], n_split["val"], n_split["test"], spec.seed, size, size, data_fp[:16])
    log.info("backbone: %s (%s weights%s), %.1fM parameters, built in %.1f s", name, spec.weights or "random",
             "; classifier replaced" if any("replaced" in n for n in notes) else "",
             sum(p.numel() for p in backbone.parameters()) / 1e6, build_seconds)
    if spec.train_backbone_epochs == 0:
        if spec.weights is None:
            log.warning("the backbone has random weights and --train-backbone-epochs is 0: its classifier (and the "
                        "features the exits learn from) are untrained, so the final output is chance level; pass "
                        "--weights or --train-backbone-epochs N")
        elif any("replaced" in n for n in notes):
            log.warning("the backbone's classifier was replaced for %d classes and --train-backbone-epochs is 0: "
                        "the final output is untrained (chance level); pass --train-backbone-epochs N", K)
    train_shuffled = D.loader(prep.subset("train"), spec.batch_size, shuffle=True, seed=spec.seed)
    train_ordered = D.loader(prep.subset("train"), spec.batch_size)  # fixed order for the feature cache
    val = D.loader(prep.subset("val"), spec.batch_size)
    test = D.loader(prep.subset("test"), spec.batch_size)
    # The feature cache's own data check hashes only the first and last batch; name the data by content.
    cache_key = _data_key(data_fp, spec, size, prep.mean, prep.std)
    backbone_training = None
    if spec.train_backbone_epochs:
        t0 = time.perf_counter()
        log.info("fine-tuning the whole backbone for %d epochs (Adam, lr %g)", spec.train_backbone_epochs,
                 spec.backbone_lr)
        backbone_training = finetune_backbone(backbone, train_shuffled, val, spec.train_backbone_epochs,
                                              spec.backbone_lr, spec.seed)
        log.info("backbone fine-tuned in %.1f s: best val accuracy %.1f%%", time.perf_counter() - t0,
                 100 * backbone_training["best_val_accuracy"])
    backbone.eval()
    weights = _weights_for(spec, out, backbone, notes, backbone_training is not None, given_sha)

    reports: dict[str, dict[str, Any]] = {}
    for exit_type, run_dir in run_dirs.items():
        run_dir.mkdir(parents=True, exist_ok=True)
        net = presets.build(name, exit_type=exit_type, num_outputs=K, weights=backbone, input_size=size,
                            exit_paths=spec.exit_paths, exit_backend=spec.exit_backend)
        summary = accounting.summary(net, (3, size, size))
        shapes = ", ".join(f"{r.name} at {r.module} ({'x'.join(map(str, r.feature_shape[1:]))}, "
                           f"{r.params:,} params)" for r in summary.rows[:-1])
        log.info("%s exits: %s; training up to %d epochs (classifier-wise, feature cache in %s)", exit_type,
                 shapes, spec.epochs, final_out / "cache")
        t0 = time.perf_counter()
        history = train_exits(net, train_ordered, val, epochs=spec.epochs, lr=spec.lr, cache_dir=final_out / "cache",
                              cache_key=cache_key, seed=spec.seed, early_stopping_patience=spec.early_stopping_patience)
        train_seconds = time.perf_counter() - t0
        log.info("%s exits trained in %.1f s (%d epochs)", exit_type, train_seconds, len(history.epochs))
        policy, calibration = _calibrate(net, val, spec, summary.backbone_flops)
        log.info("calibrated %r on the validation split (%s): val accuracy %.1f%%, mean %sFLOPs per sample",
                 policy, calibration["method"], 100 * calibration["val_accuracy"],
                 fmt_count(calibration["val_mean_flops"]))
        t0 = time.perf_counter()
        report = evaluate(net, policy, test, input_size=(3, size, size), timing_repeats=spec.timing_repeats)
        log.info("evaluated on the %d test samples in %.1f s", report["test_samples"], time.perf_counter() - t0)
        report.update(backbone=name, exit_type=exit_type, calibration=calibration,
                      exit_training={"seconds": train_seconds, "epochs": len(history.epochs),
                                     "cache_seconds": history.cache_seconds},
                      backbone_training=backbone_training)
        net.save_exits(str(run_dir / R.EXITS_FILE))
        R.write_json(run_dir / R.POLICY_FILE, R.policy_to_json(policy))
        R.write_json(run_dir / R.REPORT_FILE, report)
        _plot({exit_type: report}, run_dir / R.PLOT_FILE,
                    spec.plot_title or f"{name} on {Path(spec.data).name}: {exit_type} exits")
        weights = _pinned_weights(weights, out, backbone, final_out)
        ref = os.path.relpath(out / weights.ref, run_dir) if weights.saved else weights.ref
        R.write_run(run_dir, {  # last: the commit point, pinning the files above by content
            "format": R.RUN_FORMAT, "backbone": name, "weights": ref, "weights_given": spec.weights, "num_outputs": K,
            "classes": images.classes, "input_size": size, "exit_type": exit_type, "exit_paths": spec.exit_paths,
            "exit_modules": list(net.exit_paths), "branch_names": list(net.branch_names),
            "data": {"path": str(Path(spec.data).resolve()), "samples": len(images), "fingerprint": data_fp,
                     "val_fraction": spec.val_fraction, "test_fraction": spec.test_fraction, "seed": spec.seed,
                     "mean": prep.mean, "std": prep.std},
            "training": {"epochs": spec.epochs, "lr": spec.lr, "batch_size": spec.batch_size,
                         "train_backbone_epochs": spec.train_backbone_epochs, "backbone_lr": spec.backbone_lr},
            "calibration": {"budget": spec.budget, "fractions": spec.fractions},
            "sha256": {R.EXITS_FILE: R.file_sha256(run_dir / R.EXITS_FILE),
                       R.POLICY_FILE: R.file_sha256(run_dir / R.POLICY_FILE), "weights": weights.sha256},
            **spec.extra,
        })
        reports[exit_type] = report
    if len(spec.exit_types) > 1:
        _plot(reports, out / R.PLOT_FILE, spec.plot_title or f"{name} on {Path(spec.data).name}")
    return reports


def _resolve_weights(run_dir: Path, ref: str | None) -> str | None:
    if ref is None or is_torchvision_name(ref):
        return ref
    p = Path(ref)
    return str(p if p.is_absolute() else (run_dir / p))


def evaluate_run(run_dir: str | os.PathLike, data: str | os.PathLike, timing_repeats: int = 3,
                 quiet: bool = False, prepare_inference: bool = False) -> dict[str, Any]:
    """Rebuild a ``slvit-fast train`` run and evaluate it on the test split of ``data`` (same split);
    ``prepare_inference``: evaluate the network as prepared for CPU inference (see ``evaluate``).

    The run's files are checked against the sha256 its ``run.json`` records (a UsageError names a file
    that changed); ``report["data_matches_run"]`` is False (with a warning) when ``data`` are not the
    data the run was trained on, None when an old run recorded no fingerprint of them."""
    d = Path(run_dir)
    # every file of the run is checked and loaded under the folder's publish lock (a train publishing into it
    # waits): never one run's exits with another run's split
    with R.reading_run(d) as run:  # (also holds the folder of a weights file in another run folder)
        weights = _resolve_weights(d, run["weights"])
        R.verify_files(d, run, weights)
        try:
            net = presets.build(run["backbone"], exit_type=run["exit_type"], num_outputs=run["num_outputs"],
                                weights=weights, input_size=run["input_size"], exit_paths=run["exit_paths"])
            net.load_exits(str(d / R.EXITS_FILE))
        except (ValueError, FileNotFoundError) as e:  # a damaged or edited run directory (CheckpointMismatchError too)
            raise UsageError(f"cannot rebuild the run in {d}: {str(e).splitlines()[0]}") from None
        policy = R.policy_from_json(R.read_json(d / R.POLICY_FILE), str(d / R.POLICY_FILE))
    try:
        policy.check(net.num_exits)
    except ValueError as e:
        raise UsageError(f"{d / R.POLICY_FILE}: {e}") from None
    images = D.load_images(data)
    if images.classes != run["classes"]:
        raise UsageError(f"{data} has classes {images.classes[:10]}, the run in {d} was trained on {run['classes'][:10]}")
    info = run["data"]
    recorded = info.get("fingerprint")
    matches: bool | None = None if recorded is None else True
    if len(images) != info["samples"]:
        log.warning("%s has %d samples, the run was trained on %d: the test split is not the one held out in training",
                    data, len(images), info["samples"])
        matches = False
    elif recorded is not None:
        got = _data_fingerprint_logged(images)
        if got != recorded:
            log.warning("%s is not the data the run was trained on (content sha256 %s..., the run's %s...): same "
                        "classes and sample count, but samples or labels differ or are in another order, so the "
                        "test split is not the one held out in training", data, got[:16], recorded[:16])
            matches = False
    prep = D.prepare(images, run["input_size"], info["val_fraction"], info["test_fraction"], info["seed"],
                     info["mean"], info["std"])
    test = D.loader(prep.subset("test"), run["training"]["batch_size"])
    report = evaluate(net, policy, test, input_size=(3, run["input_size"], run["input_size"]),
                      timing_repeats=timing_repeats, prepare_inference=prepare_inference)
    report.update(backbone=run["backbone"], exit_type=run["exit_type"], data_matches_run=matches)
    if not quiet:
        print(format_report(report, f"{run['backbone']} with {run['exit_type']} exits from {d}, "
                                    f"test split of {data} ({report['test_samples']} samples):"), flush=True)
    return report
