"""Helpers for training under ``torchrun``: rank/world queries and cross-rank sums."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum each value over ranks (metrics must agree on every rank for schedulers and early stopping)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
