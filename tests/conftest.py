import contextlib
import fnmatch
import os
import zlib

# Where the kernel tests run, from SLVIT_FAST_TEST_DEVICE (scripts/test.sh passes it through):
#   unset / "cpu"  the default: no GPU on the machines this suite runs on, so Triton kernels run in the
#                  interpreter (TRITON_INTERPRET=1, set before any Triton kernel module is imported) and
#                  the CUDA kernel sources through the SIMT emulator (cuda-emu).
#   "cuda"         a GPU run: tests/test_gpu_kernels.py runs the kernel matrix on CUDA tensors with the
#                  compiled Triton kernels and _C_cuda, plus the device-agnostic tests; the files that
#                  check kernels on the CPU (interpreter, emulator, CPU backend) are not collected.
_DEVICE_RAW = os.environ.get("SLVIT_FAST_TEST_DEVICE", "")
TEST_DEVICE = _DEVICE_RAW.strip().lower() or "cpu"
if TEST_DEVICE == "cuda":
    _INTERPRET_SET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test files that check kernels on the CPU (Triton interpreter, SIMT emulator, fused CPU backend): not
# collected when SLVIT_FAST_TEST_DEVICE=cuda (their GPU counterpart is tests/test_gpu_kernels.py).
CPU_KERNEL_TEST_FILES = ("test_triton_backend.py", "test_cuda_emu.py", "test_cuda_mma.py", "test_emu_*.py",
                         "test_cpu_*.py")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    if TEST_DEVICE not in ("cpu", "cuda"):
        raise pytest.UsageError(f"SLVIT_FAST_TEST_DEVICE={_DEVICE_RAW!r}: expected 'cpu' (the default) or 'cuda'")
    if TEST_DEVICE == "cuda" and _INTERPRET_SET:
        raise pytest.UsageError(f"SLVIT_FAST_TEST_DEVICE=cuda runs the compiled Triton kernels, but "
                                f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']!r} would run the interpreter: "
                                f"unset it")


def pytest_ignore_collect(collection_path, config):
    if TEST_DEVICE == "cuda" and any(fnmatch.fnmatch(collection_path.name, p) for p in CPU_KERNEL_TEST_FILES):
        return True
    return None


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared, oversubscribed 2-core machine this is ~2x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after (also on failure)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """The fused CPU kernels on 1 and 2 threads; small test shapes would otherwise stay on one thread
    (below the parallel-work threshold), so the threshold is lifted for the test."""
    monkeypatch.setenv("SLVIT_FAST_CPU_PARALLEL_MIN_FLOPS", "0")
    with num_threads(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seeded_per_test(request):
    """Every test starts from torch's default generator seeded by its own name: unseeded torch.randn inputs
    are then the same in every run, so a tolerance failure reproduces instead of flickering (one did, ~1 in
    13 runs of test_cpu_entry.py + test_cpu_memory.py, on fresh random data)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
