"""The training checkpoint folder: what is written after each epoch and read back on resume.

``training_state.pt`` is the one commit point: a single file holding everything a resumed run needs
(exit weights, :class:`TrainingState`, history, RNG state and, end-to-end, the backbone; sealed with a
CRC-32, checked on read: _seal), written to a
temporary file, fsynced and renamed over the previous one. A kill at any moment leaves either the
previous epoch's complete state or the new one, never a mix. The other files are exports derived from
it, written after the commit (each atomically) and rewritten on resume, so a kill can leave them one
epoch behind but never torn: ``last.safetensors`` (the exits of the last completed epoch, loadable with
``load_exits``), ``history.json`` / ``history.csv`` and, at the end, ``best.safetensors``. Temporary files left by a killed write (``.<name>.*.tmp``)
are removed when the next run starts.

Resuming checks before it changes anything: the file must be readable (else one error naming it), and it
records each exit's type, module path and config (the metadata ``save_exits`` writes, compared the way
``load_exits`` compares it) and a hash of the backbone the run started from (the one the feature cache
uses); a resume onto other exits or another backbone raises :class:`CheckpointMismatchError` naming the
field and both values, with nothing loaded. Checkpoints written before these records existed are refused
with a message saying so; :func:`upgrade_checkpoint` adds the records when you know they fit.

The RNG state saved after each epoch includes the torch.Generators the loaders draw their order from
(``DataLoader(generator=...)``, a sampler's own generator) and the epoch counter of samplers that have one
(``set_epoch``), so a resumed run shuffles exactly as an unbroken one; a loader whose randomness cannot be
seen (another sampler type, an IterableDataset) gets a warning at resume.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler,
                              SubsetRandomSampler, WeightedRandomSampler)
from torch.utils.data.distributed import DistributedSampler

from ..checkpoint import _describe, _load_tensors, _plan, atomic_write, read_exit_metadata, save_exits
from ..errors import CheckpointMismatchError
from .faults import pause_point
from .feature_cache import fsync_dir
from .fingerprint import tensors_hash
from .history import History
from .state import TrainingState

log = logging.getLogger("slvit_fast.training")

STATE_FORMAT = "slvit_fast.training_state/3"  # /3: exit configs + backbone hash recorded, loaders' RNG saved
OLD_FORMATS = (None, "slvit_fast.training_state/2")  # None: the first layout (exits in last.safetensors)


# -- the sealed file ---------------------------------------------------------------------------------
# training_state.pt holds {"format", "sealed": the torch.save bytes of the payload as a uint8 tensor,
# "crc32": of those bytes}. torch.load does not check its zip records' CRCs: a flipped byte in a stored
# tensor loaded silently (review 10) and would have resumed training from corrupted weights or optimizer
# moments. The envelope costs one more copy of a few MB per epoch.
def _seal(payload: dict[str, Any]) -> bytes:
    inner = io.BytesIO()
    torch.save(payload, inner)
    raw = inner.getbuffer()
    outer = io.BytesIO()
    torch.save({"format": payload["format"], "sealed": torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                "crc32": zlib.crc32(raw)}, outer)
    return outer.getvalue()


def _unseal(obj: Any, path: Path, how: str) -> Any:
    """The payload inside a sealed file (checked), or an older format's unsealed payload as it is."""
    if not isinstance(obj, dict) or "sealed" not in obj:
        if isinstance(obj, dict) and obj.get("format") == STATE_FORMAT:
            # written by the development build of this format before the envelope existed (review 10): its
            # records are all there, only the checksum is missing; the next epoch's save seals it
            log.warning("%s: a %s training state without the checksum envelope (written before it existed): "
                        "read unverified; the next save seals it", path, STATE_FORMAT)
        return obj
    raw = obj["sealed"]
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() != 1:
        raise CheckpointMismatchError(f"{path}: the training state's envelope is damaged: {how}")
    data = raw.numpy().tobytes()
    if zlib.crc32(data) != obj.get("crc32"):
        raise CheckpointMismatchError(f"{path}: checksum mismatch (CRC-32 {zlib.crc32(data):08x}, recorded "
                                      f"{obj.get('crc32')!r}): the file was damaged after it was written: {how}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointMismatchError(f"{path}: cannot read the sealed training state ({type(e).__name__}: {e}): "
                                      f"{how}") from e


# -- random number state -----------------------------------------------------------------------------
_PLAIN_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)  # .generator (None: global)


def _epoch_sampler(sampler: Any) -> bool:
    """A sampler whose order is a function of its ``epoch`` counter alone (``set_epoch``): DistributedSampler,
    and samplers that declare it with ``order_follows_epoch = True`` (CopycatSampler). A declaration, not an
    import: copycat.py calls train_exits, whose loop imports this module."""
    return isinstance(sampler, DistributedSampler) or getattr(type(sampler), "order_follows_epoch", False) is True


def _loader_rng(loader) -> dict[str, Any] | None:
    """What decides a loader's order besides the global RNG, by role; None if some of it cannot be seen.

    ``{"role.generator": torch.Generator, "role.epoch": sampler}``. A DataLoader draws its workers' base
    seed from ``loader.generator`` and ``RandomSampler`` & co. their order from their ``generator`` (the
    same object as ``loader.generator`` for ``shuffle=True``; ``None`` means the global RNG, saved anyway);
    DistributedSampler and CopycatSampler derive it from their ``epoch`` counter (``set_epoch``);
    SequentialSampler has none. Lists and tuples of batches have no randomness.
    """
    if isinstance(loader, (list, tuple)):
        return {}
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):  # its order: hidden
        return None
    found: dict[str, Any] = {}
    seen: list[torch.Generator] = []

    def add(role: str, g: Any) -> None:
        if isinstance(g, torch.Generator) and all(g is not h for h in seen):
            seen.append(g)
            found[role + ".generator"] = g

    add("loader", loader.generator)
    samplers = [("sampler", loader.sampler)]
    if loader.batch_sampler is not None:
        if type(loader.batch_sampler) is not BatchSampler:
            return None
        if loader.batch_sampler.sampler is not loader.sampler:
            samplers.append(("batch_sampler.sampler", loader.batch_sampler.sampler))
    for role, sampler in samplers:
        if isinstance(sampler, SequentialSampler):
            continue
        if _epoch_sampler(sampler):  # the order follows a counter: that is all of its state
            found[role + ".epoch"] = sampler
        elif isinstance(sampler, _PLAIN_SAMPLERS):
            add(role, sampler.generator)
        else:
            return None
    return found


def _opaque_part(loader) -> str:
    """The type name of what hides a loader's random state (for the warning)."""
    if not isinstance(loader, DataLoader):
        return type(loader).__name__
    if isinstance(loader.dataset, IterableDataset):
        return type(loader.dataset).__name__
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        return type(loader.batch_sampler).__name__
    sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
    if isinstance(sampler, (SequentialSampler, *_PLAIN_SAMPLERS)) or _epoch_sampler(sampler):
        sampler = loader.sampler
    return type(sampler).__name__


def _loader_state(loader) -> dict[str, Any] | None:
    found = _loader_rng(loader)
    if found is None:
        return None
    return {role: (v.get_state() if role.endswith(".generator") else v.epoch) for role, v in found.items()}


def rng_state(loaders: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The global RNG state and, per loader (``{"train": loader, ...}``), its generators and sampler epochs."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loaders:
        state["loaders"] = {split: _loader_state(ld) for split, ld in loaders.items() if ld is not None}
    return state


def set_rng_state(state: dict[str, Any] | None, loaders: Mapping[str, Any] | None = None) -> None:
    """Restore :func:`rng_state`; a loader whose order cannot be restored exactly gets a warning."""
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved_loaders = state.get("loaders") or {}
    for split, loader in (loaders or {}).items():
        if loader is None:
            continue
        found = _loader_rng(loader)
        if found is None:
            log.warning("resuming: the %s loader's order comes from a %s whose random state the checkpoint cannot "
                        "save, so the resumed run is not guaranteed to be bit-identical to an uninterrupted one "
                        "(a DataLoader with shuffle=True and generator=..., or with a RandomSampler, resumes exactly)",
                        split, _opaque_part(loader))
            continue
        saved = saved_loaders.get(split)
        if not found:
            continue
        if saved is None or set(saved) != set(found):
            log.warning("resuming: the checkpoint holds no random state for the %s loader's %s (saved: %s), so "
                        "its order after resuming may differ from an uninterrupted run", split, sorted(found),
                        sorted(saved) if saved is not None else "none")
            continue
        for role, obj in found.items():
            if role.endswith(".generator"):
                obj.set_state(saved[role])
            else:
                obj.set_epoch(saved[role])


# -- what a checkpoint must fit ------------------------------------------------------------------------
def exit_records(net: nn.Module) -> str:
    """Each exit's key, module path, type and config, as JSON: the metadata ``save_exits`` writes."""
    return json.dumps([{"key": key, "path": net.exit_paths[i], **_describe(m)}
                       for i, (key, m) in enumerate(net.exits.items())])


def _as_exit_tensors(exits_state: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """``net.exits.state_dict()`` names (``key.name``) -> the ``key/name`` names of an exits file."""
    out = {}
    for name, t in exits_state.items():
        key = next((k for k in keys if name.startswith(k + ".")), None)
        out[f"{key}/{name[len(key) + 1:]}" if key is not None else name] = t
    return out


def _check_exits(net: nn.Module, saved: list[dict], tensors: Mapping[str, torch.Tensor], source: Any) -> None:
    """Raise naming every difference between the recorded exits and the network's (as ``load_exits`` does)."""
    keys = list(net.exits.keys())
    if [e["key"] for e in saved] != keys:
        raise CheckpointMismatchError(f"{source}: the checkpoint has exits at {[e['path'] for e in saved]}, the "
                                      f"network at {list(net.exit_paths)}; nothing was loaded")
    problems, _ = _plan(net, saved, dict(tensors))
    if problems:
        raise CheckpointMismatchError(f"{source}: does not fit this network, nothing was loaded:\n  "
                                      + "\n  ".join(problems))


def _check_backbone(saved: str, current: str, source: Any) -> None:
    if saved != current:
        raise CheckpointMismatchError(
            f"{source}: backbone: checkpoint {saved} vs model {current} (hash of the backbone's parameters, buffers "
            "and architecture when the run started): it was trained on another backbone (other weights or "
            "architecture), nothing was loaded; build the network with that backbone, or start fresh (another "
            "checkpoint_dir, delete this one, or resume=False)")


class CheckpointDir:
    def __init__(self, directory: str | Path, backbone_hash: str | None = None):
        """``backbone_hash``: :func:`tensors_hash` of the backbone the run starts from (computed if not given)."""
        self.directory = Path(directory)
        self.state_path = self.directory / "training_state.pt"
        self.last_path = self.directory / "last.safetensors"
        self._backbone_hash = backbone_hash

    def backbone_hash(self, net: nn.Module) -> str:
        if self._backbone_hash is None:
            self._backbone_hash = tensors_hash(net.backbone)
        return self._backbone_hash

    def clean_stale(self) -> list[Path]:
        """Remove temporary files of writes that a kill interrupted (only one run may use the folder)."""
        if not self.directory.is_dir():
            return []
        stale = [p for p in self.directory.glob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def has_state(self) -> bool:
        return self.state_path.exists()

    # -- writing -----------------------------------------------------------------------------------
    def save(self, net: nn.Module, state: TrainingState, history: History, rng: dict[str, Any]) -> None:
        """Commit the state after ``state.epoch``, then refresh the exports."""
        epoch = state.epoch
        pause_point("begin", epoch)
        payload = {"format": STATE_FORMAT, **state.state_dict(), "history": history.epochs, "rng": rng,
                   "exits": {k: v.detach().cpu().clone() for k, v in net.exits.state_dict().items()},
                   "exit_records": exit_records(net), "backbone_hash": self.backbone_hash(net)}
        if state.mode == "end-to-end":
            payload["backbone"] = net.backbone.state_dict()
        data = memoryview(_seal(payload))

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                half = len(data) // 2
                f.write(data[:half])
                f.flush()
                pause_point("state-partial", epoch)
                f.write(data[half:])
            pause_point("state-written", epoch)

        atomic_write(self.state_path, write)  # the commit point
        fsync_dir(self.directory)  # the rename itself survives a power cut
        pause_point("committed", epoch)
        self.export_exits(net, self.last_path, "exits-written", epoch)
        pause_point("exported", epoch)
        self.write_history(history)
        pause_point("history-written", epoch)

    def write_history(self, history: History) -> None:
        for name, text in (("history.json", history.to_json()), ("history.csv", history.to_csv())):
            atomic_write(self.directory / name, lambda tmp, text=text: Path(tmp).write_text(text))

    def export_exits(self, net: nn.Module, path: Path, point: str, epoch: int) -> None:
        # save_exits is atomic itself; giving it a temporary name of ours lets a test stop between the
        # written file and the final rename (a kill there leaves only a .tmp file, removed at the next start)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_exits(net, tmp)
        pause_point(point, epoch)
        os.replace(tmp, path)

    def save_best(self, net: nn.Module, epoch: int) -> None:
        self.export_exits(net, self.directory / "best.safetensors", "best-written", epoch)

    # -- reading -----------------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        """The payload of ``training_state.pt``; any failure to read it is one error naming the file."""
        how = (f"delete {self.directory} (or pass resume=False, or another checkpoint_dir) to train from scratch; "
               f"{self.last_path.name} there, if readable, holds the exits of the last completed epoch "
               "(net.load_exits)")
        try:
            payload = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # EOFError (empty), RuntimeError (cut short), UnpicklingError, OSError, ...
            raise CheckpointMismatchError(
                f"{self.state_path}: cannot read the training state ({type(e).__name__}: "
                f"{str(e).strip() or 'the file is empty or ends early'}); the file is damaged or not a slvit_fast "
                f"checkpoint: {how}") from e
        payload = _unseal(payload, self.state_path, how)
        if not isinstance(payload, dict):
            raise CheckpointMismatchError(f"{self.state_path}: holds a {type(payload).__name__}, not a slvit_fast "
                                          f"training state: {how}")
        return payload

    def load(self, net: nn.Module, state: TrainingState, history: History) -> dict[str, Any] | None:
        """Restore everything saved by :meth:`save`; returns the RNG state to apply before the next epoch.

        Everything is checked first (format, exits' types/configs/shapes, backbone, mode, optimizer
        groups): on a mismatch the error names it and neither the network nor ``state`` has changed.
        """
        payload = self.read()
        fmt = payload.get("format")
        if fmt in OLD_FORMATS:
            raise CheckpointMismatchError(
                f"{self.state_path}: written by an older slvit_fast ({fmt or 'first format'}), before checkpoints "
                "recorded the exits' configs and the backbone, so it cannot be checked against this network. Start "
                f"fresh (delete {self.directory}, another checkpoint_dir, or resume=False), or, if you know it was "
                "written for this very network and backbone, record them once with "
                f"slvit_fast.training.checkpointing.upgrade_checkpoint({str(self.directory)!r}, net) and rerun")
        if fmt != STATE_FORMAT:
            raise CheckpointMismatchError(f"{self.state_path}: unknown training state format {fmt!r} (this "
                                          f"slvit_fast reads {STATE_FORMAT!r}); written by a newer slvit_fast?")
        lacking = [k for k in ("exits", "exit_records", "backbone_hash", "history", "epoch", "mode", "num_exits",
                               "optimizers", "schedulers", "best_loss", "bad_epochs", "stopped", "best_state")
                   if k not in payload]
        if lacking:
            raise CheckpointMismatchError(f"{self.state_path}: the training state lacks {lacking}; the file is "
                                          f"damaged: delete {self.directory} (or pass resume=False) to start fresh")
        _check_exits(net, json.loads(payload["exit_records"]),
                     _as_exit_tensors(payload["exits"], list(net.exits.keys())), self.state_path)
        _check_backbone(payload["backbone_hash"], self.backbone_hash(net), self.state_path)
        state.check_state_dict(payload, self.state_path)
        if state.mode == "end-to-end" and "backbone" not in payload:
            raise CheckpointMismatchError(f"{self.state_path}: an end-to-end training state without the backbone")
        # all checked: from here on nothing is expected to fail
        state.load_state_dict(payload, self.state_path)
        net.exits.load_state_dict(payload["exits"])
        if state.mode == "end-to-end":
            net.backbone.load_state_dict(payload["backbone"])
        history.epochs = payload["history"]
        return payload.get("rng")

    def refresh_exports(self, net: nn.Module, history: History, epoch: int) -> None:
        """After :meth:`load`: a kill after the commit may have left the exports one epoch behind."""
        self.export_exits(net, self.last_path, "exits-written", epoch)
        self.write_history(history)



def upgrade_checkpoint(checkpoint_dir: str | Path, net: nn.Module) -> Path:
    """Let a checkpoint of an older slvit_fast be resumed: record ``net``'s exit configs and backbone in it.

    Older checkpoints did not record what they were trained for, so ``train_exits`` refuses them. Call this
    once, with the network built exactly as for the interrupted run (for end-to-end training: with the
    backbone it started from), only when you know the checkpoint belongs to it: the backbone cannot be
    checked (its hash is taken from ``net``); the exits' tensor shapes are, and their configs too when the
    folder's ``last.safetensors`` is readable. Returns the rewritten ``training_state.pt``; a current
    checkpoint is left as it is.
    """
    ckpt = CheckpointDir(checkpoint_dir)
    payload = ckpt.read()
    fmt = payload.get("format")
    if fmt == STATE_FORMAT:
        return ckpt.state_path
    if fmt not in OLD_FORMATS:
        raise CheckpointMismatchError(f"{ckpt.state_path}: unknown training state format {fmt!r}")
    keys = list(net.exits.keys())
    records = json.loads(exit_records(net))
    if ckpt.last_path.exists():  # the exports carry the configs: check them as load_exits would
        records = read_exit_metadata(ckpt.last_path)
    if "exits" in payload:
        tensors = _as_exit_tensors(payload["exits"], keys)
    elif ckpt.last_path.exists():  # the first format kept the exits only in last.safetensors
        tensors = _load_tensors(ckpt.last_path)
    else:
        raise CheckpointMismatchError(f"{ckpt.state_path}: holds no exit weights and {ckpt.last_path} is missing: "
                                      "nothing to resume; delete the folder to start fresh")
    _check_exits(net, records, tensors, ckpt.state_path)
    payload.update(format=STATE_FORMAT, exit_records=exit_records(net), backbone_hash=ckpt.backbone_hash(net),
                   exits={name.replace("/", ".", 1): t for name, t in tensors.items()})
    sealed = _seal(payload)
    atomic_write(ckpt.state_path, lambda tmp: Path(tmp).write_bytes(sealed))
    fsync_dir(ckpt.directory)
    log.warning("%s: recorded the exits' configs and backbone hash of the given network in an older checkpoint; "
                "its backbone could not be checked", ckpt.state_path)
    return ckpt.state_path
