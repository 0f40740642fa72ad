"""What the self-test runs on a device: backends, dtypes, preset configurations, batch sizes.

* Backends: every backend of the registry that can run on the device (its own ``unavailable_reason``
  decides). ``cuda-emu`` is a CPU test backend (the CUDA kernel source under the SIMT emulator); on a
  CPU ``triton`` runs only under the Triton interpreter (``TRITON_INTERPRET=1`` set before import).
* Dtypes: fp32 everywhere; tf32 on CUDA (fp32 storage, TF32 matmuls); bf16 and fp16 where the backend
  takes them and the torch reference can run in them on the device (the paired tolerance needs it).
* Presets: every paper preset; presets with the identical exit configuration (e.g. resnet152-b1 and
  densenet201-b1) are checked once and the result is reported for each. ``quick`` caps the channel
  count (keeping the token/head geometry, which is what kernels get wrong) so a run takes seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from .. import backends
from ..config import SLViTConfig
from ..exit_presets import get_preset, list_presets
from .tolerance import DTYPES

QUICK_MAX_CHANNELS = 16
CORRECTNESS_BATCH = 2
# Emulated/interpreted backends run every kernel thread on the host: a full-size AudioCSRNet exit takes
# ~10-17 s per dtype in the emulator. They check kernel *source*, whose token/head geometry is what
# matters, so they run the presets with channels capped here and at batch 1 (the compiled backends see
# the full sizes).
VEHICLE_MAX_CHANNELS = 32
VEHICLE_BATCH = 1
# Backends that are correctness vehicles, not performance paths, on this device type: never timed.
EMULATED = {"cuda-emu": "SIMT emulator of the CUDA kernels on the CPU (a test vehicle, not a fast path)"}
INTERPRETED_TRITON = "Triton interpreter (TRITON_INTERPRET=1): numpy on the CPU, a test vehicle, not a fast path"


@dataclass(frozen=True)
class BackendPlan:
    name: str
    dtypes: tuple[str, ...]  # dtype names it is checked in (empty when skipped)
    skipped: str | None = None  # why it is not checked at all
    note: str = ""  # e.g. "Triton interpreter"
    dtype_skips: tuple[tuple[str, str], ...] = ()  # (dtype, reason) pairs it does not support here

    @property
    def vehicle(self) -> bool:
        """An emulator/interpreter run on the host: a correctness vehicle, not a performance path."""
        return bool(self.note)

    @property
    def timed(self) -> bool:
        return self.skipped is None and not self.vehicle


def reference_runs_in(dtype: torch.dtype, device: str) -> bool:
    """The torch reference (LayerNorm, matmul) runs in ``dtype`` on ``device``: needed for paired tolerances."""
    try:
        x = torch.ones(2, 4, dtype=dtype, device=device)
        torch.nn.functional.layer_norm(x, (4,))
        x @ x.T
        return True
    except (RuntimeError, NotImplementedError):
        return False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def plan_backends(device: str, only: list[str] | None = None) -> list[BackendPlan]:
    """Every known backend with the dtypes it is checked in on ``device``, or why it is skipped."""
    if only:
        unknown = [b for b in only if b not in backends.KNOWN_BACKENDS]
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; valid: {list(backends.KNOWN_BACKENDS)}")
    plans = []
    for name in backends.KNOWN_BACKENDS:
        if only and name not in only:
            continue
        if device == "cuda" and name == "cuda-emu":
            plans.append(BackendPlan(name, (), "a CPU test backend (the CUDA kernels under the SIMT emulator): "
                                               "checked by `slvit-fast selftest --device cpu`"))
            continue
        try:
            backend = backends.get(name)
        except Exception as e:  # not built / import failed: the registry's reason
            plans.append(BackendPlan(name, (), str(e)))
            continue
        names, skips = [], []
        for dt_name, (dtype, _) in DTYPES.items():
            if dt_name == "tf32" and device != "cuda":
                continue  # TF32 is a CUDA tensor-core mode
            probe = torch.empty(1, 1, 1, 1, dtype=dtype, device=device)
            reason = backend.unavailable_reason(probe)
            if reason is None and not reference_runs_in(dtype, device):
                reason = f"the torch reference cannot run in {dtype} on {device} (needed for paired tolerances)"
            if reason is None:
                names.append(dt_name)
            else:
                skips.append((dt_name, reason))
        if not names:
            plans.append(BackendPlan(name, (), skips[0][1] if skips else "no dtype", dtype_skips=tuple(skips)))
            continue
        note = EMULATED.get(name, "")
        if name == "triton" and device == "cpu":
            note = INTERPRETED_TRITON
        plans.append(BackendPlan(name, tuple(names), None, note, tuple(skips)))
    return plans


def cap_channels(cfg: SLViTConfig, max_channels: int) -> SLViTConfig:
    return replace(cfg, in_channels=min(cfg.in_channels, max_channels))


def preset_config(name: str, quick: bool) -> SLViTConfig:
    cfg = SLViTConfig(**get_preset(name).slvit_kwargs())
    return cap_channels(cfg, QUICK_MAX_CHANNELS) if quick else cfg


def preset_configs(quick: bool, presets: list[str] | None = None) -> dict[str, tuple[SLViTConfig, str | None]]:
    """Preset -> (config, first preset with the identical config or None): identical configs run once."""
    names = presets or list_presets()
    seen: dict[SLViTConfig, str] = {}
    out = {}
    for name in names:
        cfg = preset_config(name, quick)
        out[name] = (cfg, seen.get(cfg))
        seen.setdefault(cfg, name)
    return out
