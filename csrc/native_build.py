"""Decides which native extensions setup.py builds; prints why one is skipped.

Kept out of setup.py so the decision logic stays readable and testable. Until csrc/ has sources this
builds nothing; the C++/CUDA issue fills in ``_extensions``.
"""

from __future__ import annotations

import os
import sys

SKIP_ENV = "SLVIT_FAST_SKIP_NATIVE"


def _say(msg: str) -> None:
    print(f"slvit_fast setup: {msg}", file=sys.stderr)


def _extensions() -> list:
    return []


def native_build_options() -> dict:
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        _say(f"{SKIP_ENV} is set: installing pure-Python (backends 'torch' and 'triton' only)")
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        _say("torch is not installed in the build environment: installing pure-Python. Install torch "
             "first and build with `pip install --no-build-isolation .` to compile the C++/CUDA backends")
        return {}
    exts = _extensions()
    if not exts:
        return {}
    return {"ext_modules": exts, "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}
