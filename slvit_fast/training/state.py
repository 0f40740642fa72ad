"""Everything ``train_exits`` carries from one epoch to the next, in one object.

Optimizers and schedulers (one per exit in classifier-wise mode, one overall end-to-end), each exit's
best validation loss, epochs without improvement, whether it stopped early, and its best weights.
``state_dict`` / ``load_state_dict`` are the only way this state reaches or leaves a checkpoint, so
what a resumed run continues from is defined here and nowhere else.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointMismatchError

MODES = ("classifier-wise", "end-to-end")


class TrainingState:
    def __init__(self, net: nn.Module, mode: str, lr: float, lr_factor: float, lr_patience: int):
        if mode not in MODES:
            raise ValueError(f"mode must be 'classifier-wise' or 'end-to-end', got {mode!r}")
        self.mode = mode
        self.num_exits = K = net.num_exits
        self.exits = list(net.exits.values())
        if mode == "classifier-wise":  # exits train independently: one optimizer and schedule each
            groups = [list(m.parameters()) for m in self.exits]
        else:
            groups = [[p for p in net.parameters() if p.requires_grad]]
        self.optimizers = [torch.optim.Adam(g, lr=lr) for g in groups]
        self.schedulers = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=lr_factor, patience=lr_patience)
                           for o in self.optimizers]
        self.best_loss: list[float] = [math.inf] * K
        self.bad_epochs: list[int] = [0] * K
        self.stopped: list[bool] = [False] * K
        self.best_state: list[dict[str, Tensor] | None] = [None] * K
        self.epoch = -1  # last completed epoch

    @property
    def start_epoch(self) -> int:
        return self.epoch + 1

    def active(self) -> list[bool]:
        return [not s for s in self.stopped]

    def optimizer_of(self, i: int) -> torch.optim.Optimizer:
        return self.optimizers[i if self.mode == "classifier-wise" else 0]

    def lr_of(self, i: int) -> float:
        return self.optimizer_of(i).param_groups[0]["lr"]

    def end_epoch(self, epoch: int, val_loss: list[float], early_stopping_patience: int | None
                  ) -> tuple[list[dict[str, Any]], list[int]]:
        """Step the schedulers, track best weights and early stopping after ``epoch``.

        Returns each exit's ``{"lr", "stopped"}`` for the history (end-to-end: taken before the shared
        scheduler steps) and the indices of the exits that stopped at this epoch.
        """
        was_stopped = list(self.stopped)
        status = []
        for i in range(self.num_exits):
            if self.mode == "classifier-wise" and not self.stopped[i]:
                self.schedulers[i].step(val_loss[i])
            if not self.stopped[i]:
                if val_loss[i] < self.best_loss[i]:
                    self.best_loss[i], self.bad_epochs[i] = val_loss[i], 0
                    self.best_state[i] = {k: v.detach().clone() for k, v in self.exits[i].state_dict().items()}
                else:
                    self.bad_epochs[i] += 1
                    if early_stopping_patience is not None and self.bad_epochs[i] >= early_stopping_patience:
                        # end-to-end exits share one optimizer: the run stops only when all of them have
                        self.stopped[i] = self.mode == "classifier-wise"
            status.append({"lr": self.lr_of(i), "stopped": self.stopped[i]})
        if self.mode == "end-to-end":
            self.schedulers[0].step(sum(val_loss))
            if early_stopping_patience is not None and min(self.bad_epochs) >= early_stopping_patience:
                self.stopped = [True] * self.num_exits
        self.epoch = epoch
        return status, [i for i in range(self.num_exits) if self.stopped[i] and not was_stopped[i]]

    def restore_best(self) -> None:
        for module, state in zip(self.exits, self.best_state):
            if state:
                module.load_state_dict(state)

    # -- checkpoint form (torch.load(weights_only=True)-safe: tensors, numbers, strings, lists, dicts) ----
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "mode": self.mode, "num_exits": self.num_exits,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "best_loss": list(self.best_loss), "bad_epochs": list(self.bad_epochs), "stopped": list(self.stopped),
            "best_state": [b if b is not None else {} for b in self.best_state],
        }

    def check_state_dict(self, state: dict[str, Any], source: Any) -> None:
        """Raise :class:`CheckpointMismatchError` if ``state`` cannot be loaded into this one (nothing changes)."""
        if state["num_exits"] != self.num_exits or state["mode"] != self.mode:
            raise CheckpointMismatchError(f"{source}: saved for {state['num_exits']} exits in {state['mode']!r} mode, "
                                          f"not {self.num_exits} exits in {self.mode!r} mode")
        saved = [[len(g["params"]) for g in o["param_groups"]] for o in state["optimizers"]]
        mine = [[len(g["params"]) for g in o.param_groups] for o in self.optimizers]
        if saved != mine or len(state["schedulers"]) != len(self.schedulers):
            raise CheckpointMismatchError(f"{source}: optimizer parameter groups: checkpoint {saved} vs model {mine} "
                                          "(parameters per group): it was saved for other trainable parameters")

    def load_state_dict(self, state: dict[str, Any], source: Any) -> None:
        self.check_state_dict(state, source)
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for s, ss in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(ss)
        self.best_loss = list(state["best_loss"])
        self.bad_epochs = list(state["bad_epochs"])
        self.stopped = list(state["stopped"])
        self.best_state = [b if b else None for b in state["best_state"]]
        self.epoch = state["epoch"]
