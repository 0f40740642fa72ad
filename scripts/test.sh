#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up the venv and the build, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k keras -x).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup_env.sh"
cd "$REPO"
# No GPU here: Triton kernels run in the interpreter (set before any kernel module is imported).
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec "$SLVIT_FAST_PY" -m pytest tests "$@"
