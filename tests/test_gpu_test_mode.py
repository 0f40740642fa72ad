"""The CUDA test mode (`SLVIT_FAST_TEST_DEVICE=cuda bash scripts/test.sh`), checked without a GPU: the
script's early exit, what conftest.py collects in each mode, and the size of the GPU kernel matrix."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _env(**overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("SLVIT_FAST_TEST_DEVICE", "TRITON_INTERPRET")}
    env.update(overrides)
    return env


def _gpu_visible() -> bool:
    if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg"):
        return True
    smi = shutil.which("nvidia-smi")
    return bool(smi and "GPU" in subprocess.run([smi, "-L"], capture_output=True, text=True).stdout)


@pytest.mark.skipif(_gpu_visible(), reason="this machine has a GPU: the no-GPU path does not apply")
def test_script_without_gpu_exits_at_once_with_a_message():
    start = time.monotonic()
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "test.sh")], capture_output=True, text=True,
                       env=_env(SLVIT_FAST_TEST_DEVICE="cuda"), timeout=60)
    assert r.returncode == 1
    assert "SLVIT_FAST_TEST_DEVICE=cuda needs an NVIDIA GPU" in r.stderr and "none is visible" in r.stderr
    assert "[setup]" not in r.stderr and r.stdout == ""  # before any venv / build work
    assert time.monotonic() - start < 10


def test_script_rejects_an_unknown_device():
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "test.sh")], capture_output=True, text=True,
                       env=_env(SLVIT_FAST_TEST_DEVICE="tpu"), timeout=60)
    assert r.returncode == 2 and "SLVIT_FAST_TEST_DEVICE='tpu' is not a test device" in r.stderr


# A throwaway test directory with the real conftest.py: which files each mode collects, and the
# TRITON_INTERPRET each mode leaves for the tests.
FAKE_TESTS = {
    "test_triton_backend.py": "def test_interp(): pass\n",
    "test_cuda_emu.py": "def test_emu(): pass\n",
    "test_emu_mma_layout.py": "def test_emu_layout(): pass\n",
    "test_cpu_backend.py": "def test_cpu(): pass\n",
    "test_accounting.py": textwrap.dedent("""
        import os
        def test_interpret_env():
            want = os.environ["EXPECT_INTERPRET"]
            assert os.environ.get("TRITON_INTERPRET", "unset") == want
        """),
}


def _run_fake(tmp_path, *args, **env):
    for name, text in FAKE_TESTS.items():
        (tmp_path / name).write_text(text)
    shutil.copy(os.path.join(TESTS, "conftest.py"), tmp_path / "conftest.py")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path), *args],
                          capture_output=True, text=True, env=_env(**env), cwd=tmp_path, timeout=300)


def test_conftest_default_mode_collects_everything_under_the_interpreter(tmp_path):
    r = _run_fake(tmp_path, EXPECT_INTERPRET="1")
    assert r.returncode == 0 and "5 passed" in r.stdout, r.stdout + r.stderr


def test_conftest_cuda_mode_leaves_out_cpu_kernel_files_and_the_interpreter(tmp_path):
    r = _run_fake(tmp_path, "-v", "-v", SLVIT_FAST_TEST_DEVICE="cuda", EXPECT_INTERPRET="unset")
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
    assert "test_accounting.py::test_interpret_env PASSED" in r.stdout


def test_conftest_cuda_mode_refuses_the_interpreter_and_unknown_devices(tmp_path):
    r = _run_fake(tmp_path, SLVIT_FAST_TEST_DEVICE="cuda", TRITON_INTERPRET="1", EXPECT_INTERPRET="1")
    assert r.returncode == 4 and "TRITON_INTERPRET='1' would run the interpreter" in r.stderr, r.stderr
    r = _run_fake(tmp_path, SLVIT_FAST_TEST_DEVICE="rocm", EXPECT_INTERPRET="1")
    assert r.returncode == 4 and "SLVIT_FAST_TEST_DEVICE='rocm'" in r.stderr, r.stderr


# pytest on tests/test_gpu_kernels.py in CUDA mode, with torch.cuda.is_available() patched to True (as on
# a GPU machine): what would run there.
_PATCHED_PYTEST = ("import sys, torch; torch.cuda.is_available = lambda: True; import pytest; "
                   "sys.exit(pytest.main(sys.argv[1:]))")


def _gpu_pytest(*args):
    return subprocess.run([sys.executable, "-c", _PATCHED_PYTEST, "-q", "-p", "no:cacheprovider",
                           os.path.join(TESTS, "test_gpu_kernels.py"), *args], capture_output=True, text=True,
                          env=_env(SLVIT_FAST_TEST_DEVICE="cuda"), cwd=ROOT, timeout=300)


def test_gpu_matrix_collects_every_backend_scenario_and_dtype():
    import slvit_fast as sf
    from slvit_fast import SLViTConfig
    from slvit_fast.exit_presets import get_preset

    from kernel_cases import AWKWARD_CONFIGS

    r = _gpu_pytest("--collect-only")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [line.split("::", 1)[1] for line in r.stdout.splitlines() if "::" in line]
    unique_presets = len({SLViTConfig(**get_preset(n).slvit_kwargs()) for n in sf.list_presets()})
    dtypes, backends = 4, 2
    per_backend = dtypes * (unique_presets + 1 + len(AWKWARD_CONFIGS) + 3 + 3) + 1 + 1  # + nan, launches
    assert len(ids) == backends * per_backend + 2, len(ids)  # + preset coverage, compiled-Triton check
    for backend in ("triton", "cuda"):
        for dt in ("fp32", "tf32", "fp16", "bf16"):
            assert f"test_awkward[{backend}-N144-h12-{dt}]" in ids
            assert f"test_awkward[{backend}-grid16x9-h24-extra-{dt}]" in ids
            assert f"test_batch[{backend}-64-{dt}]" in ids and f"test_batch[{backend}-7-{dt}]" in ids
            assert f"test_preset_batch64[{backend}-{dt}]" in ids
            assert f"test_two_layers[{backend}-{dt}]" in ids
        presets = [i for i in ids if i.startswith(f"test_preset[{backend}-")]
        assert len(presets) == dtypes * unique_presets
        assert any("audiocsrnet" in i and i.endswith("-bf16]") for i in presets), presets
        assert f"test_nan_isolated[{backend}]" in ids and f"test_real_gpu_launches[{backend}]" in ids


def test_gpu_matrix_runs_when_a_gpu_is_present_and_skips_with_reasons_otherwise():
    r = _gpu_pytest("-k", "test_every_preset_is_covered")
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr  # not skipped
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        os.path.join(TESTS, "test_gpu_kernels.py"), "-k", "test_every_preset_is_covered"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert "1 skipped" in r.stdout and "SLVIT_FAST_TEST_DEVICE=cuda bash scripts/test.sh" in r.stdout, r.stdout
