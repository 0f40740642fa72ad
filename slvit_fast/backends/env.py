"""The environment switches of slvit_fast, parsed in one place so every switch reads the same way.

* ``SLVIT_FAST_BACKEND``: a backend name or ``auto`` (see :mod:`slvit_fast.backends`).
* ``SLVIT_FAST_CPU_FUSED``: on/off switch of the fused AVX2 inference path of backend ``"cpu"``. The
  C++ extension reads it itself, on every call and for direct op calls too (``fused_switch`` in
  csrc/cpu/slvit_cpu.cpp), with exactly the rules of :func:`flag`; keep the two in step.
* ``SLVIT_FAST_CPU_ISA``: instruction set of that path's GEMM tiles, ``auto`` (default; unset or empty:
  AVX-512 when the CPU and OS support it, else AVX2) | ``avx2`` | ``avx512``, any case. Also read by the
  C++ side on every call (``fused_isa`` in csrc/cpu/slvit_cpu.cpp): any other value is an error naming
  it, and ``avx512`` on a CPU without AVX-512F/DQ/BW/VL an error naming the missing feature.
  :func:`slvit_fast.backends.cpu_backend.fused_isa` reports the one in use.

On/off switches accept ``1/true/yes/on`` and ``0/false/no/off`` (any case; unset or empty = the
default). Any other value is an error naming the variable and the value: a typo must not silently
select the other path.
"""

from __future__ import annotations

import os
from typing import Iterable

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")

BACKEND = "SLVIT_FAST_BACKEND"
CPU_FUSED = "SLVIT_FAST_CPU_FUSED"
CPU_ISA = "SLVIT_FAST_CPU_ISA"


def flag(name: str, default: bool) -> bool:
    """The on/off switch ``name`` from the environment (``default`` when unset or empty)."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not an on/off value; use one of "
                     f"{'/'.join(TRUE_VALUES)} or {'/'.join(FALSE_VALUES)}, or unset it")


def choice(name: str, valid: Iterable[str], default: str) -> str:
    """The value of ``name`` if it is one of ``valid`` (``default`` when unset or empty)."""
    raw = os.environ.get(name, "")
    value = raw.strip()
    if not value:
        return default
    valid = list(valid)
    if value not in valid:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid value; valid: {valid}")
    return value


__all__ = ["TRUE_VALUES", "FALSE_VALUES", "BACKEND", "CPU_FUSED", "CPU_ISA", "flag", "choice"]
