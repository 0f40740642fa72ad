#!/usr/bin/env bash
# Creates (or refreshes) the project venv and installs slvit_fast into it, editable, with its native
# extensions. Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (skips what is current).
#
#   SLVIT_FAST_VENV   where the venv lives (default: .venv in the repo)
#   PYTHON            interpreter that creates the venv (default: python3)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SLVIT_FAST_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

say() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# Dependencies first (torch must be present before setup.py can build the extensions).
deps_stamp="$VENV/.slvit_fast_deps"
deps_hash="$(sha256sum "$REPO/pyproject.toml" "$REPO/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ "$(cat "$deps_stamp" 2>/dev/null)" != "$deps_hash" ]; then
  # torch's CUDA build and its libraries take ~6 GB: say so up front instead of pip's "[Errno 28] No space
  # left on device" minutes into the download (a full disk once failed CI that way)
  need_kb=$((8 * 1024 * 1024))
  avail_kb="$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 {print $4}')"
  if [ -n "$avail_kb" ] && [ "$avail_kb" -lt "$need_kb" ]; then
    say "only $((avail_kb / 1024)) MB free on the disk holding $VENV; installing the dependencies needs ~8 GB" \
        "(torch 2.14.1 CUDA build + torchvision + dev extras). Free space or set SLVIT_FAST_VENV to another disk."
    exit 1
  fi
  say "installing dependencies (torch 2.14.1 + torchvision 0.29.1 and the dev extras; a few minutes on a new machine)"
  "$VPY" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
  "$VPY" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
  "$VPY" -m pip install -q --disable-pip-version-check einops numpy safetensors tqdm pytest pytest-benchmark \
      hypothesis "keras>=3" matplotlib ninja build \
      scikit-learn onnx onnxscript onnxruntime
  echo "$deps_hash" > "$deps_stamp"
fi

# The package itself, editable; rebuilt when the build inputs (setup files, csrc/) change.
pkg_stamp="$VENV/.slvit_fast_pkg"
pkg_hash="$( (cd "$REPO" && { ls setup.py pyproject.toml; find csrc -type f 2>/dev/null; } | sort \
  | xargs sha256sum; echo "$REPO") | sha256sum | cut -c1-16)"
if [ "$(cat "$pkg_stamp" 2>/dev/null)" != "$pkg_hash" ]; then
  say "installing slvit_fast (editable, native extensions built if a compiler is present)"
  (cd "$REPO" && MAX_JOBS="${MAX_JOBS:-2}" "$VPY" -m pip install -q --disable-pip-version-check \
      --no-build-isolation --no-deps -e .)
  echo "$pkg_hash" > "$pkg_stamp"
fi
export SLVIT_FAST_PY="$VPY"
