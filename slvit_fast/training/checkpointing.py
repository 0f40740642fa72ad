"""The training checkpoint folder: what is written after each epoch and read back on resume.

``training_state.pt`` is the one commit point: a single file holding everything a resumed run needs
(exit weights, :class:`TrainingState`, history, RNG state and, end-to-end, the backbone), written to a
temporary file, fsynced and renamed over the previous one. A kill at any moment leaves either the
previous epoch's complete state or the new one, never a mix. The other files are exports derived from
it, written after the commit (each atomically) and rewritten on resume, so a kill can leave them one
epoch behind but never torn: ``last.safetensors`` (the exits of the last completed epoch, loadable with
``load_exits``), ``history.json`` / ``history.csv`` and, at the end, ``best.safetensors``. Temporary files left by a killed write (``.<name>.*.tmp``)
are removed when the next run starts.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_write, load_exits, save_exits
from .faults import pause_point
from .feature_cache import fsync_dir
from .history import History
from .state import TrainingState

STATE_FORMAT = "slvit_fast.training_state/2"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointDir:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.state_path = self.directory / "training_state.pt"
        self.last_path = self.directory / "last.safetensors"

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
                   "exits": {k: v.detach().cpu().clone() for k, v in net.exits.state_dict().items()}}
        if state.mode == "end-to-end":
            payload["backbone"] = net.backbone.state_dict()
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getbuffer()

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
    def load(self, net: nn.Module, state: TrainingState, history: History) -> dict[str, Any] | None:
        """Restore everything saved by :meth:`save`; returns the RNG state to apply before the next epoch."""
        payload = torch.load(self.state_path, map_location="cpu", weights_only=True)
        state.load_state_dict(payload, self.state_path)
        if "exits" in payload:
            net.exits.load_state_dict(payload["exits"])
        else:  # written by an older slvit_fast: exits in last.safetensors
            load_exits(net, self.last_path)
        if state.mode == "end-to-end":
            net.backbone.load_state_dict(payload["backbone"])
        history.epochs = payload["history"]
        return payload.get("rng")

    def refresh_exports(self, net: nn.Module, history: History, epoch: int) -> None:
        """After :meth:`load`: a kill after the commit may have left the exports one epoch behind."""
        self.export_exits(net, self.last_path, "exits-written", epoch)
        self.write_history(history)

