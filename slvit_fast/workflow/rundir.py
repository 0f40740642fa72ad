"""The run directory ``slvit-fast train --out DIR`` writes and ``slvit-fast evaluate --run DIR`` reads.

=======================  ==========================================================================
``run.json``             how to rebuild the network and the data splits: backbone, weights source,
                         input size, exit type and paths, classes, normalisation, split seed/fractions;
                         the data's content fingerprint; the sha256 of every file below that
                         ``evaluate`` uses. Moved in last when a run is published
``backbone.safetensors`` the backbone's weights, when they are not simply a file or torchvision name
                         (fine-tuned, a replaced classifier, or random weights)
``exits.safetensors``    the trained exits (``MultiExitNetwork.save_exits``; configs in its metadata)
``policy.json``          the calibrated exit policy (``{"type": "MaxSoftmax", "thresholds": [...]}``)
``report.json``          test-split results: per exit params/FLOPs/accuracy, early-exit accuracy, mean
                         FLOPs, FLOP speedup, measured wall-clock
``accuracy_flops.png``   accuracy vs mean FLOPs per sample, per exit and along the threshold sweep
``cache/``               the exits' feature cache (``train_exits(cache_dir=...)``)
``.slvit-fast.lock``     held (``fcntl.flock``) while a training run writes the folder; its sibling
                         ``.slvit-fast.publish.lock`` exclusively while files are moved in, shared while
                         ``evaluate`` reads a run
``.publishing.json``     only while a finished run is being moved in from its staging folder (see below)
=======================  ==========================================================================

Integrity, so that a run directory is never silently a mix of two runs and a killed run never loses one:
a training run locks the output folder (a second one into it fails at once), writes everything into a
staging folder ``.staging-<pid>`` inside it, then commits by writing ``.publishing.json`` (atomically) and
moves the files in, each ``run.json`` last with the sha256 of the exits, the policy and the backbone
weights file it references (:func:`publish`). Killed before the commit, the previous run is untouched;
after it, the next ``train`` or ``evaluate`` of the folder finishes the moves (:func:`finish_publish`).
``evaluate`` refuses a folder without ``run.json`` (still running, or a run that failed) and any file whose
content is not the one recorded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from .. import policies
from ..checkpoint import atomic_write
from .errors import UsageError

log = logging.getLogger("slvit_fast.workflow")

__all__ = ["RUN_FILE", "REPORT_FILE", "POLICY_FILE", "EXITS_FILE", "BACKBONE_FILE", "PLOT_FILE", "LOCK_FILE",
           "RUN_FORMAT", "write_json", "write_run", "read_json", "policy_to_json", "policy_from_json", "read_run",
           "file_sha256", "dataset_fingerprint", "locked_out", "verify_files", "finish_publish", "PUBLISH_FILE",
           "roll_forward", "reading_run", "shared_lock"]

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


def remove_leftovers(folder: Path) -> None:
    """Staging folders and half-written records of killed runs in ``folder`` (its lock held, any committed record
    already rolled forward: only a holder of the lock can have made them, and it is gone)."""
    for old in folder.glob(STAGE_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    for tmp in folder.glob(f".{PUBLISH_FILE}.*.tmp"):  # a record's atomic write killed before its rename
        tmp.unlink(missing_ok=True)
    for probe in folder.glob(".slvit-fast.rename-probe-*"):  # _check_movable killed mid-probe
        probe.unlink(missing_ok=True)


def stage_folder(out: Path) -> Path:
    """A fresh staging folder inside ``out`` for the run holding its lock; leftovers of killed runs (only a
    holder of the lock can have made them, and it is gone) are removed first."""
    remove_leftovers(out)
    stage = out / f"{STAGE_PREFIX}{os.getpid()}"
    stage.mkdir()
    return stage


PUBLISH_FILE = ".publishing.json"
PUBLISH_LOCK = ".slvit-fast.publish.lock"


def _open_lock(path: Path, create: bool = True):
    """A lock file, for ``flock`` (which needs no write access): created if missing (``create``), else opened
    read-only when it is not ours to write (another user's file in a shared folder: review 11). None when it
    does not exist and may not or cannot be created (a read-only folder: nothing can publish there)."""
    try:
        return open(path, "a+") if create or path.exists() else None
    except OSError:
        try:
            return open(path, "rb")
        except OSError:
            return None


def _flock_waiting(f, how: int, what: str) -> None:
    """``flock`` that says what it waits for when it has to (a stopped process holding it would otherwise be a
    silent hang: review 11)."""
    try:
        try:
            fcntl.flock(f, how | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for %s (another slvit-fast train or evaluate is %s it)", what,
                        "reading" if how == fcntl.LOCK_EX else "publishing into")
            fcntl.flock(f, how)
    except OSError as e:  # e.g. NFS, where flock on a file opened read-only fails
        raise UsageError(f"cannot lock {what} ({e.strerror})") from None


@contextlib.contextmanager
def _publish_locks(folders: list[Path], shared: bool = False) -> Iterator[None]:
    """``flock`` on each folder's publish lock (exclusive: files are being moved in; shared: ``evaluate`` reads
    a run's files), waiting for the other side. Publishing is short; so is reading a run's files. A folder
    where the lock file cannot be opened or created is read-only: nothing can publish into it."""
    with contextlib.ExitStack() as stack:
        for folder in sorted({Path(f) for f in folders}):
            f = _open_lock(folder / PUBLISH_LOCK)
            if f is None:
                continue
            stack.enter_context(f)
            _flock_waiting(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, str(folder / PUBLISH_LOCK))
        yield


def publish(stage: Path, out: Path, run_dirs: list[Path]) -> None:
    """Move a finished run from ``stage`` (laid out as ``out``) into ``out``. Until here the previous run in
    ``out`` was untouched, so a run that fails or is killed before this leaves it as it was.

    The commit point is ``OUT/.publishing.json`` (written atomically, naming the staging folder and the run
    folders): once it exists the new run *is* the run of ``out``, and whoever next locks ``out`` (the next
    ``train``, or ``evaluate``) finishes moving it in (:func:`finish_publish`), so a kill at any point of the
    moves leaves either the previous run or, after that roll-forward, the new one - never a folder without a
    usable run. What could make a move fail (a destination that is a folder, or on another file system than
    the staging folder - a symlinked run folder) is checked before the commit. The moves run under the
    folders' publish locks, which ``evaluate`` holds shared while it reads a run's files, so it never reads
    half of one run and half of another. Nothing but ``run.json`` files is deleted: a file this run does not
    write (an earlier run's backbone.safetensors) may be what its --weights or another run.json references
    (review 10), and run.json pins what each run uses."""
    rel = sorted({d.relative_to(out).as_posix() for d in run_dirs})
    with _publish_locks([out, *run_dirs]):
        try:
            _check_movable(stage, out, run_dirs)
            write_json(out / PUBLISH_FILE, {"stage": stage.name, "run_dirs": rel})
        except BaseException:
            if not (out / PUBLISH_FILE).is_file():  # not committed: the previous run stays, this one is dropped
                shutil.rmtree(stage, ignore_errors=True)
            raise
        _fsync_dir(out)
        _finish(out, *_read_record(out))


def _check_movable(stage: Path, out: Path, run_dirs: list[Path]) -> None:
    """Every staged file can be renamed into place: no folder in its way, and a rename from the staging folder
    into each destination folder works (review 11: a run folder symlinked to another file system, or a bind
    mount of the same one - equal st_dev, still EXDEV - failed the first rename after the commit)."""
    targets: set[Path] = set()
    for src in (p for p in stage.rglob("*") if p.is_file()):
        dst = out / src.relative_to(stage)
        if dst.is_dir():
            raise UsageError(f"cannot publish the run into {str(out)!r}: {dst} is a folder; move it away and train again")
        parent = dst.parent
        while not parent.exists():  # created by the move, inside an existing folder
            parent = parent.parent
        targets.add(parent)
    probe = stage / ".rename-probe"
    for folder in sorted(targets):
        probe.write_bytes(b"")
        moved = folder / f".slvit-fast.rename-probe-{os.getpid()}"
        try:
            os.rename(probe, moved)
        except OSError as e:
            probe.unlink(missing_ok=True)
            why = ("another file system or mount - a symlink?" if e.errno == errno.EXDEV else
                   "is it writable?" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "")
            raise UsageError(f"cannot publish the run into {str(out)!r}: a file cannot be moved from {stage} into "
                             f"{folder} ({e.strerror}{': ' + why if why else ''}), so the run could not be put in "
                             f"place atomically; pass an --out whose folders are on one writable file system") from None
        moved.unlink(missing_ok=True)


def _way_out(out: Path) -> str:
    return (f"delete {out / PUBLISH_FILE} and {out / (STAGE_PREFIX + '*')} (the interrupted run is then lost; the "
            f"folder keeps what it holds now) and train again")


def _read_record(out: Path) -> tuple[Path, list[Path]]:
    marker = out / PUBLISH_FILE
    way_out = _way_out(out)
    try:
        m = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{marker} is not readable ({e}): the interrupted run in {str(out)!r} cannot be finished; "
                         f"{way_out}") from None
    ok = (isinstance(m, dict) and isinstance(m.get("stage"), str) and m["stage"].startswith(STAGE_PREFIX)
          and "/" not in m["stage"] and isinstance(m.get("run_dirs"), list)
          and all(isinstance(r, str) and ".." not in Path(r).parts and not Path(r).is_absolute() for r in m["run_dirs"]))
    if not ok:  # written by publish() atomically, so only a hand edit gets here
        raise UsageError(f"{marker} is not a publishing record of slvit-fast ({m!r}): the interrupted run in "
                         f"{str(out)!r} cannot be finished; {way_out}")
    return out / m["stage"], [out / r for r in m["run_dirs"]]


def finish_publish(out: str | os.PathLike) -> bool:
    """Complete the publishing that ``out``'s ``.publishing.json`` records (the caller holds ``out``'s lock);
    idempotent, so a kill in here is finished by the next call. False when there was nothing to finish."""
    out = Path(out)
    if not (out / PUBLISH_FILE).is_file():
        return False
    stage, run_dirs = _read_record(out)
    with _publish_locks([out, *run_dirs]):
        gone = not stage.is_dir()
        if gone:
            log.warning("%s records a run whose staging folder %s is gone (removed by hand?): there is nothing to "
                        "finish; the record is dropped and the folder keeps what it holds", out / PUBLISH_FILE,
                        stage.name)
        _finish(out, stage, run_dirs)
    return not gone


def _finish(out: Path, stage: Path, run_dirs: list[Path]) -> None:
    """Publishing's moves, the stage removed and the record last (with the publish locks held)."""
    if stage.is_dir():  # else every file was moved in (the stage goes only after that)
        try:
            _move_in(stage, out, run_dirs)
        except OSError as e:
            raise UsageError(f"cannot finish publishing the run {out / PUBLISH_FILE} records: {e}; fix that and run "
                             f"'slvit-fast evaluate' or 'train' on {str(out)!r} again to finish it (its files are in "
                             f"{stage}), or {_way_out(out)}") from None
        shutil.rmtree(stage, ignore_errors=True)
    (out / PUBLISH_FILE).unlink()
    _fsync_dir(out)


def _supersede_dependents(stage: Path, out: Path, run_dirs: list[Path]) -> None:
    """Other runs in ``out``'s sub-folders whose weights are a file this publish replaces with other content (a
    demo's per-type runs pin ``../backbone.safetensors``, which a single run into OUT rewrites) are superseded:
    their run.json goes, with a warning, before the file is replaced - as per-type folders replace a single run
    at OUT's level. They pinned the old file by sha256, so left in place they could never be evaluated again
    (review 11). Runs that use their own files, or whose pinned file comes back with the same bytes, are kept;
    a run.json that cannot be removed is left with a warning (its sha256 check then names the changed file)."""
    staged = {(out / p.relative_to(stage)).resolve(): p for p in stage.rglob("*") if p.is_file() and p.name != RUN_FILE}
    keep = {d.resolve() for d in run_dirs}
    for sub in sorted(p for p in out.iterdir() if p.is_dir() and p.resolve() not in keep and (p / RUN_FILE).is_file()):
        with _publish_locks([sub]):  # (a train publishing into OUT/<sub> right now: its new run.json is not ours)
            try:
                run = json.loads((sub / RUN_FILE).read_text())
                ref, pinned = run.get("weights"), (run.get("sha256") or {}).get("weights")
            except (OSError, ValueError, AttributeError):
                continue
            if not isinstance(ref, str):  # (a torchvision weights name resolves to no file this run writes)
                continue
            target = (Path(ref) if Path(ref).is_absolute() else sub / ref).resolve()
            if target not in staged or (pinned is not None and file_sha256(staged[target]) == pinned):
                continue
            try:
                (sub / RUN_FILE).unlink(missing_ok=True)
            except OSError as e:
                log.warning("the run in %s uses %s, which this run replaces, and its %s cannot be removed (%s): "
                            "evaluating it will name the changed file", sub, target, RUN_FILE, e.strerror)
                continue
            log.warning("the run in %s used %s, which this run replaces: that run is superseded (its %s removed; "
                        "the rest of its files stay)", sub, target, RUN_FILE)


def _move_in(stage: Path, out: Path, run_dirs: list[Path]) -> None:
    """The moves of :func:`publish`, safe to repeat after a kill: an old ``run.json`` is removed only while its
    replacement is still staged (a repeat must not delete a new one already moved in), the new ones last."""
    if out not in run_dirs:  # per-type run folders replace a single run at out's level (review 10)
        (out / RUN_FILE).unlink(missing_ok=True)
    staged_runs = {d: stage / d.relative_to(out) for d in run_dirs}
    for d, s in staged_runs.items():
        if (s / RUN_FILE).is_file():
            (d / RUN_FILE).unlink(missing_ok=True)
    _supersede_dependents(stage, out, run_dirs)
    for src in sorted(p for p in stage.rglob("*") if p.is_file() and p.name != RUN_FILE):
        dst = out / src.relative_to(stage)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    for d in sorted(staged_runs):
        d.mkdir(parents=True, exist_ok=True)
        _fsync_dir(d)  # the files moved in above are durable before the run.json that pins them
        if (staged_runs[d] / RUN_FILE).is_file():
            os.replace(staged_runs[d] / RUN_FILE, d / RUN_FILE)
            _fsync_dir(d)


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
def _try_lock(folder: Path) -> Iterator[bool]:
    """Hold ``folder``'s exclusive lock for the block if no one else does; yields whether it got it (OSError:
    the lock file can be neither created nor opened)."""
    f = _open_lock(_lock_path(folder))
    if f is None:
        raise PermissionError(13, "cannot open or create the lock file", str(_lock_path(folder)))
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def locked_out(out: str | os.PathLike, what: str = "--out") -> Iterator[Path]:
    """Create ``out`` and hold an exclusive lock on it for the block; another holder is a UsageError. A
    publishing an earlier run was killed in is finished first (:func:`finish_publish`). ``what`` names the
    folder in errors (a demo's per-type folder is not an --out the user gave)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what} {str(out)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = _open_lock(_lock_path(out))
    except OSError as e:
        raise UsageError(f"cannot create --out {str(out)!r} ({e.strerror})") from None
    if f is None:
        raise UsageError(f"cannot open or create {_lock_path(out)}: is --out {str(out)!r} writable?")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another slvit-fast run is writing {str(out)!r} right now (it holds "
                             f"{_lock_path(out)}); wait for it to finish or pass another --out") from None
        except OSError as e:
            raise UsageError(f"cannot lock {_lock_path(out)} ({e.strerror})") from None
        try:
            if finish_publish(out):
                log.warning("finished publishing the run an interrupted 'slvit-fast train' had committed in %s", out)
            yield out
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _record_holders(folder: Path) -> list[Path]:
    """The folders whose publishing record could name ``folder``: itself and its parent (the demo's OUT), as
    given and resolved (``--run .`` or a symlink: review 11)."""
    out = []
    for f in (folder, folder.resolve()):
        for o in (f, f.parent):
            if o not in out:
                out.append(o)
    return out


def _concerns(holder: Path, folder: Path) -> bool:
    """``holder`` has a publishing record that names ``folder`` (its own record always does; the parent's only
    when ``folder`` is one of its run folders: a single-type run publishing into OUT does not hold up
    ``evaluate`` of OUT/exp2 - review 11). A parent's unreadable record is not taken to name it."""
    if not (holder.is_dir() and (holder / PUBLISH_FILE).is_file()):
        return False
    target = folder.resolve()
    if holder.resolve() == target:
        return True
    try:
        _, run_dirs = _read_record(holder)
    except UsageError:
        return False
    return any(r.resolve() == target for r in run_dirs)


def roll_forward(folder: str | os.PathLike) -> bool:
    """``evaluate`` (and ``train`` before it reads anything from its --out or its --weights folder): finish a
    publishing that was killed after its commit point and concerns ``folder``, as the next ``train`` into that
    folder would first. Not while another process holds that folder's lock (a train publishing right now or
    just starting, another evaluate rolling it forward), nor where the lock cannot be taken (a read-only copy:
    :func:`reading_run` then refuses to serve the superseded run). True when a record was left for a busy lock
    holder to finish."""
    busy = False
    for o in _record_holders(Path(folder)):
        if _concerns(o, Path(folder)):
            try:
                with _try_lock(o) as got:
                    if got and finish_publish(o):
                        log.warning("finished publishing the run an interrupted 'slvit-fast train' had committed "
                                    "in %s", o)
                    busy = busy or not got
            except OSError as e:
                log.warning("%s records a run whose publishing was interrupted, but it cannot be finished here "
                            "(%s)", o, e)
    return busy


def _is_slvit_folder(folder: Path) -> bool:
    return folder.is_dir() and any((folder / n).exists() for n in (RUN_FILE, PUBLISH_LOCK, LOCK_FILE, PUBLISH_FILE))


@contextlib.contextmanager
def shared_lock(*folders: str | os.PathLike) -> Iterator[None]:
    """The publish locks of ``folders`` held shared for the block (taken in sorted order, as publish takes its
    exclusive ones, so the two never wait on each other in a circle), for each folder slvit-fast writes runs
    into (no lock file is left in a user's folder). ``evaluate`` holds them on the run folder and its parent (a
    demo's ``../backbone.safetensors``: review 11), and on the folder of a weights file in another run."""
    with _publish_locks([Path(f) for f in folders if _is_slvit_folder(Path(f))], shared=True):
        yield


def _weights_folder(run_dir: Path) -> Path | None:
    """The folder of the backbone weights file ``run_dir``'s run.json references, if it is a file."""
    try:
        ref = json.loads((run_dir / RUN_FILE).read_text()).get("weights")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(ref, str):
        return None
    path = Path(ref) if Path(ref).is_absolute() else run_dir / ref
    return path.resolve().parent if path.is_file() else None


@contextlib.contextmanager
def reading_run(run_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """``run.json`` of ``run_dir`` (:func:`read_run`) with the publish locks of the run folder, its parent and
    the folder of its weights file held shared for the block (resolved paths: ``--run .``; one sorted call,
    as publish takes its exclusive ones, so the two cannot wait on each other in a circle - review 11): read
    and load every file of the run inside it, and a ``train`` publishing into any of them waits. Without it a
    publish between the hash checks and the loads served one run's exits with the other's split, or a demo's
    per-type run with another run's ``../backbone.safetensors``. A pending publishing record that could not be
    rolled forward is an error: its run is the folder's run, not the files in place (one that another process
    is rolling forward is waited for, at most a minute)."""
    d = Path(run_dir)
    deadline = time.monotonic() + 60.0
    while True:
        busy = roll_forward(d)
        rd = d.resolve()
        wf = _weights_folder(rd)  # read without the lock: checked again under it
        with shared_lock(rd, rd.parent, *([wf] if wf is not None else [])):
            pending = [o for o in _record_holders(d) if _concerns(o, d)]
            same = _weights_folder(rd) == wf
            if not pending and same:
                yield read_run(d)
                return
        if not pending:  # the run was replaced between the two reads: take the locks of the new one
            continue
        if not busy or time.monotonic() > deadline:
            o = pending[0]
            raise UsageError(f"{str(o)!r} holds a finished run whose publishing was interrupted "
                             f"({o / PUBLISH_FILE}); its files are not all in place yet. Evaluate it once with "
                             f"write access to {str(o)!r} (that finishes the move), or wait for the process that "
                             f"holds {_lock_path(o)} to finish")
        time.sleep(0.1)  # another process holds the lock and is finishing it


def being_written(folder: Path) -> bool:
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
    if d.is_file():
        raise UsageError(f"{str(d)!r} is a file; --run takes the run's folder ({str(d.parent)!r})")
    if not d.is_dir():
        raise UsageError(f"run directory {str(d)!r} does not exist")
    if not (d / RUN_FILE).is_file():
        if being_written(d):
            raise UsageError(f"{str(d)!r} is being written by a training run right now ({RUN_FILE} is written "
                             f"last); evaluate it when that run has finished")
        inner = sorted(p.name for p in d.iterdir() if (p / RUN_FILE).is_file() and not p.name.startswith(STAGE_PREFIX))
        if inner:  # the demo's OUT: one run directory per exit type
            raise UsageError(f"{str(d)!r} is not a run directory (no {RUN_FILE}); its sub-folder(s) "
                             f"{', '.join(inner)} are: pass one of them")
        if any((d / f).exists() for f in (EXITS_FILE, POLICY_FILE, REPORT_FILE, BACKBONE_FILE, "cache")):
            raise UsageError(f"{str(d)!r} holds an incomplete run: it has no {RUN_FILE}, which a training run "
                             f"writes last, so the run that wrote it was interrupted or failed (or a later run into "
                             f"its parent folder replaced the weights it used); train again")
        raise UsageError(f"{str(d)!r} is not a run directory of 'slvit-fast train' (no {RUN_FILE})")
    run = read_json(d / RUN_FILE)
    if not isinstance(run, dict):
        raise UsageError(f"{d / RUN_FILE}: expected a JSON object, got {type(run).__name__}")
    for f in (EXITS_FILE, POLICY_FILE):
        if not (d / f).is_file():
            raise UsageError(f"run directory {str(d)!r} has no {f} (was it deleted after the run?)")
    return run
