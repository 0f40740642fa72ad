"""The training checkpoint folder: what is written after each epoch and read back on resume.

Files: ``last.safetensors`` (the exits after the last completed epoch), ``training_state.pt`` (the
:class:`TrainingState`, the history and, end-to-end, the backbone) and ``best.safetensors`` (the
exits returned by the run, written at the end).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_write, load_exits, save_exits
from .history import History
from .state import TrainingState

log = logging.getLogger("slvit_fast.training")


class CheckpointDir:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.state_path = self.directory / "training_state.pt"

    def has_state(self) -> bool:
        return self.state_path.exists()

    def save(self, net: nn.Module, state: TrainingState, history: History) -> None:
        save_exits(net, self.directory / "last.safetensors")
        payload = {**state.state_dict(), "history": history.epochs}
        if state.mode == "end-to-end":
            payload["backbone"] = net.backbone.state_dict()
        atomic_write(self.state_path, lambda tmp: torch.save(payload, tmp))

    def load(self, net: nn.Module, state: TrainingState, history: History) -> None:
        payload = torch.load(self.state_path, map_location="cpu", weights_only=True)
        state.load_state_dict(payload, self.state_path)
        load_exits(net, self.directory / "last.safetensors")
        if state.mode == "end-to-end":
            net.backbone.load_state_dict(payload["backbone"])
        history.epochs = payload["history"]

    def save_best(self, net: nn.Module) -> None:
        save_exits(net, self.directory / "best.safetensors")
