#!/usr/bin/env bash
# The main job: sets up the venv and the build, then runs the demo (`slvit-fast demo`).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup_env.sh"
cd "$REPO"
exec "$SLVIT_FAST_PY" -m slvit_fast.cli demo "$@"
