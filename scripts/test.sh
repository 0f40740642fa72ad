#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up the venv and the build, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k keras -x).
#
# SLVIT_FAST_TEST_DEVICE=cuda bash scripts/test.sh   (a machine with an NVIDIA GPU): the kernel test
# matrix on CUDA tensors with the compiled Triton kernels and _C_cuda (tests/test_gpu_kernels.py; no
# interpreter, no emulator, same tolerances) plus the device-agnostic tests (tests/conftest.py leaves out
# the files that check kernels on the CPU). Add `-k test_gpu_kernels` for the GPU matrix alone.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE="${SLVIT_FAST_TEST_DEVICE:-cpu}"
DEVICE="${DEVICE,,}"  # case-insensitive, like tests/conftest.py
case "$DEVICE" in
  cpu | cuda) ;;
  *) echo "scripts/test.sh: SLVIT_FAST_TEST_DEVICE='$DEVICE' is not a test device: use cpu (the default) or cuda" >&2
     exit 2 ;;
esac

gpu_visible() {  # any NVIDIA GPU device node or a GPU listed by nvidia-smi (WSL: /dev/dxg)
  compgen -G "/dev/nvidia[0-9]*" > /dev/null || [ -e /dev/dxg ] \
    || { command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q '^GPU'; }
}
if [ "$DEVICE" = cuda ] && ! gpu_visible; then
  # at once, before the venv/build setup: nothing to run without a GPU
  echo "scripts/test.sh: SLVIT_FAST_TEST_DEVICE=cuda needs an NVIDIA GPU, and none is visible on this machine" \
       "(no /dev/nvidia* device; nvidia-smi lists no GPU). Without SLVIT_FAST_TEST_DEVICE the suite runs on the" \
       "CPU (Triton interpreter, CUDA kernels through the SIMT emulator)." >&2
  exit 1
fi

source "$REPO/scripts/setup_env.sh"
cd "$REPO"

if [ "$DEVICE" = cuda ]; then
  unset TRITON_INTERPRET  # compiled Triton kernels
  export SLVIT_FAST_TEST_DEVICE=cuda
  "$SLVIT_FAST_PY" - << 'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"scripts/test.sh: SLVIT_FAST_TEST_DEVICE=cuda, but torch {torch.__version__} (CUDA "
             f"{torch.version.cuda}) sees no CUDA device: check the driver and CUDA_VISIBLE_DEVICES")
major, minor = torch.cuda.get_device_capability(0)
print(f"[test] CUDA device 0: {torch.cuda.get_device_name(0)} (sm_{major}{minor}), torch {torch.__version__}",
      file=sys.stderr)
EOF
  exec "$SLVIT_FAST_PY" -m pytest tests "$@"
fi

# No GPU here: Triton kernels run in the interpreter (set before any kernel module is imported).
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec "$SLVIT_FAST_PY" -m pytest tests "$@"
