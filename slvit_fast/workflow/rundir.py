"""The run directory ``slvit-fast train --out DIR`` writes and ``slvit-fast evaluate --run DIR`` reads.

=======================  ==========================================================================
``run.json``             how to rebuild the network and the data splits: backbone, weights source,
                         input size, exit type and paths, classes, normalisation, split seed/fractions;
                         the data's content fingerprint; the sha256 of every file below that
                         ``evaluate`` uses. Written last: it is the run's commit point
``backbone.safetensors`` the backbone's weights, when they are not simply a file or torchvision name
                         (fine-tuned, a replaced classifier, or random weights)
``exits.safetensors``    the trained exits (``MultiExitNetwork.save_exits``; configs in its metadata)
``policy.json``          the calibrated exit policy (``{"type": "MaxSoftmax", "thresholds": [...]}``)
``report.json``          test-split results: per exit params/FLOPs/accuracy, early-exit accuracy, mean
                         FLOPs, FLOP speedup, measured wall-clock
``accuracy_flops.png``   accuracy vs mean FLOPs per sample, per exit and along the threshold sweep
``cache/``               the exits' feature cache (``train_exits(cache_dir=...)``)
``.slvit-fast.lock``     held (``fcntl.flock``) while a training run writes the folder
=======================  ==========================================================================

Integrity, so that a run directory is never silently a mix of two runs: a training run locks the
output folder (a second one into it fails at once), deletes the ``run.json`` files it will replace
before it writes anything else, and writes each ``run.json`` last (atomically) with the sha256 of the
exits, the policy and the backbone weights file it references. ``evaluate`` refuses a folder without
``run.json`` (interrupted or still running) and any file whose content is not the one recorded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from .. import policies
from ..checkpoint import atomic_write
from .errors import UsageError

log = logging.getLogger("slvit_fast.workflow")

__all__ = ["RUN_FILE", "REPORT_FILE", "POLICY_FILE", "EXITS_FILE", "BACKBONE_FILE", "PLOT_FILE", "LOCK_FILE",
           "RUN_FORMAT", "write_json", "write_run", "read_json", "policy_to_json", "policy_from_json", "read_run",
           "file_sha256", "dataset_fingerprint", "locked_out", "verify_files"]

RUN_FILE, REPORT_FILE, POLICY_FILE = "run.json", "report.json", "policy.json"
EXITS_FILE, BACKBONE_FILE, PLOT_FILE = "exits.safetensors", "backbone.safetensors", "accuracy_flops.png"
LOCK_FILE = ".slvit-fast.lock"
RUN_FORMAT = 2  # 2: run.json carries "sha256" (files) and data["fingerprint"]; format 1 had neither


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomic: a temporary file in the same folder, fsynced, then renamed over ``path``."""
    text = json.dumps(_clean(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


STAGE_PREFIX = ".staging-"


def stage_folder(out: Path) -> Path:
    """A fresh staging folder inside ``out`` for the run holding its lock; leftovers of killed runs (only a
    holder of the lock can have made them, and it is gone) are removed first."""
    for old in out.glob(STAGE_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    stage = out / f"{STAGE_PREFIX}{os.getpid()}"
    stage.mkdir()
    return stage


def publish(stage: Path, out: Path, run_dirs: list[Path]) -> None:
    """Move a finished run from ``stage`` (laid out as ``out``) into ``out``. Until here the previous run in
    ``out`` was untouched, so a run that fails or is killed before this leaves it as it was. The old run.json
    of ``out`` and of each run folder goes first (``out``'s too when this run writes per-type folders: its
    plot replaces ``out``'s) and the new ones come last (the commit point); a kill in between leaves no
    run.json, which evaluate reports as an incomplete run. Nothing else is deleted: a file this run does not
    write (an earlier run's backbone.safetensors) may be what its --weights or another run.json references
    (review 10), and run.json pins what each run uses."""
    for d in {out, *run_dirs}:
        (d / RUN_FILE).unlink(missing_ok=True)
    staged_runs = {stage / d.relative_to(out) for d in run_dirs}
    for src in sorted(p for p in stage.rglob("*") if p.is_file() and p.name != RUN_FILE):
        dst = out / src.relative_to(stage)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    for d in sorted(staged_runs):
        dst = out / d.relative_to(stage)
        dst.mkdir(parents=True, exist_ok=True)
        os.replace(d / RUN_FILE, dst / RUN_FILE)
        _fsync_dir(dst)
    shutil.rmtree(stage, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def write_run(run_dir: str | os.PathLike, data: dict[str, Any]) -> None:
    """Commit a run: ``run.json`` written atomically, then the folder fsynced so the rename is durable
    (every file it pins was fsynced before, by its own atomic write)."""
    write_json(Path(run_dir) / RUN_FILE, data)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not readable JSON ({e})") from None


def policy_to_json(policy: policies.Policy) -> dict[str, Any]:
    if not isinstance(policy, policies.MaxSoftmax):
        raise TypeError(f"only MaxSoftmax policies are stored in run directories, got {policy!r}")
    t = policy.thresholds
    return {"type": "MaxSoftmax", "thresholds": list(t) if isinstance(t, (list, tuple)) else t}


def policy_from_json(data: dict[str, Any], source: str = POLICY_FILE) -> policies.Policy:
    if not isinstance(data, dict) or data.get("type") != "MaxSoftmax" or "thresholds" not in data:
        raise UsageError(f"{source}: expected {{'type': 'MaxSoftmax', 'thresholds': [...]}}, got {data!r}")
    try:
        return policies.MaxSoftmax(data["thresholds"])
    except (TypeError, ValueError) as e:  # a hand-edited threshold list: not numbers, out of [0, 1], empty
        raise UsageError(f"{source}: {e}") from None


# -- integrity ----------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_fingerprint(images: Any) -> str:
    """sha256 of a data set's content: every image's pixels (an ``.npz``: the loaded array, shape and
    dtype; an ImageFolder: each file's path relative to the folder and its bytes, in load order), the
    labels and the class names. Independent of where the data lives, so a moved copy matches; any
    changed, added, removed or reordered sample does not."""
    import torch

    h = hashlib.sha256()

    def tensor(t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)

    h.update(json.dumps(list(images.classes)).encode())
    tensor(images.labels)
    if isinstance(getattr(images, "x", None), torch.Tensor):  # ArrayImages (.npz)
        h.update(b"array")
        tensor(images.x)
    elif getattr(images, "files", None) is not None:  # FolderImages: read lazily, so hash the files
        h.update(b"files")
        root = Path(images.source)
        for f in images.files:
            p = Path(f)
            try:
                rel = p.relative_to(root).as_posix()
            except ValueError:
                rel = p.as_posix()
            h.update(f"{rel}\0{p.stat().st_size}\0".encode())
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    else:  # another Images subclass: its samples as they come out (configured size, before normalisation)
        h.update(f"raw{images.size}".encode())
        for i in range(len(images)):
            tensor(images.raw(i))
    return h.hexdigest()


def _lock_path(folder: Path) -> Path:
    return folder / LOCK_FILE


@contextlib.contextmanager
def locked_out(out: str | os.PathLike) -> Iterator[Path]:
    """Create ``out`` and hold an exclusive lock on it for the block; another holder is a UsageError."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(out), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another slvit-fast run is writing {str(out)!r} right now (it holds "
                             f"{_lock_path(out)}); wait for it to finish or pass another --out") from None
        try:
            yield out
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _being_written(folder: Path) -> bool:
    """A training run holds the lock of ``folder`` or of its parent (the demo's OUT/<exit type>)."""
    for d in (folder, folder.parent):
        p = _lock_path(d)
        if not p.is_file():
            continue
        try:
            with open(p, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(f, fcntl.LOCK_UN)
        except OSError:
            continue
    return False


def verify_files(run_dir: str | os.PathLike, run: dict[str, Any], weights_path: str | None) -> None:
    """Check every file ``run.json`` pins against its recorded sha256 (a UsageError naming the file that
    changed or is missing); a run written before these checks existed is used as is, with one log line."""
    d = Path(run_dir)
    pinned = run.get("sha256")
    if not isinstance(pinned, dict):
        log.warning("the run in %s predates run-directory integrity checks (no sha256 in its %s): its files "
                    "are used without checking that they belong together", d, RUN_FILE)
        return
    files = [(EXITS_FILE, d / EXITS_FILE, pinned.get(EXITS_FILE)), (POLICY_FILE, d / POLICY_FILE, pinned.get(POLICY_FILE))]
    if pinned.get("weights") is not None and weights_path is not None:
        files.append(("backbone weights", Path(weights_path), pinned["weights"]))
    for what, path, want in files:
        if want is None:
            raise UsageError(f"{d / RUN_FILE} records no sha256 for {what}: the run directory was edited by hand")
        if not path.is_file():
            raise UsageError(f"cannot rebuild the run in {d}: {path} does not exist")
        got = file_sha256(path)
        if got != want:
            raise UsageError(f"{path} has changed since the run in {d} was written (sha256 {got[:16]}..., "
                             f"{RUN_FILE} records {want[:16]}...): it is not the {what} this run was trained "
                             f"with; restore it or train again")


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run.json`` of a run directory (a clear error when ``run_dir`` is not a complete one)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise UsageError(f"run directory {str(d)!r} does not exist")
    if not (d / RUN_FILE).is_file():
        if _being_written(d):
            raise UsageError(f"{str(d)!r} is being written by a training run right now ({RUN_FILE} is written "
                             f"last); evaluate it when that run has finished")
        inner = sorted(p.name for p in d.iterdir() if (p / RUN_FILE).is_file() and not p.name.startswith(STAGE_PREFIX))
        if inner:  # the demo's OUT: one run directory per exit type
            raise UsageError(f"{str(d)!r} is not a run directory (no {RUN_FILE}); its sub-folder(s) "
                             f"{', '.join(inner)} are: pass one of them")
        if any((d / f).exists() for f in (EXITS_FILE, POLICY_FILE, REPORT_FILE, BACKBONE_FILE, "cache")):
            raise UsageError(f"{str(d)!r} holds an incomplete run: it has no {RUN_FILE}, which a training run "
                             f"writes last, so the run that wrote it was interrupted or failed; train again")
        raise UsageError(f"{str(d)!r} is not a run directory of 'slvit-fast train' (no {RUN_FILE})")
    run = read_json(d / RUN_FILE)
    if not isinstance(run, dict):
        raise UsageError(f"{d / RUN_FILE}: expected a JSON object, got {type(run).__name__}")
    for f in (EXITS_FILE, POLICY_FILE):
        if not (d / f).is_file():
            raise UsageError(f"run directory {str(d)!r} has no {f} (was it deleted after the run?)")
    return run
