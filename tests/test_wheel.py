"""The compiled wheel: `pip wheel .` holds the extensions; installed into a fresh venv it reports them.

The fresh venv gets torch (and the other dependencies) without reinstalling them: a ``.pth`` file in
its site-packages appends the site-packages of the interpreter running the tests (a multi-GB torch is
not downloaded or copied). The wheel itself is installed with ``--no-deps`` and imported from the
venv, outside the source tree, so the test sees exactly what the wheel ships.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    if os.environ.get("SLVIT_FAST_SKIP_NATIVE", "") not in ("", "0"):
        pytest.skip("SLVIT_FAST_SKIP_NATIVE is set")
    tmp = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"),
               MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "-w", str(tmp / "dist"), "--no-build-isolation",
                        "--no-deps", "-q", "--disable-pip-version-check"], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    (wheel,) = glob.glob(str(tmp / "dist" / "slvit_fast-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    vpy = str(venv / "bin" / "python")
    site = subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "zz_host_site_packages.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([vpy, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--disable-pip-version-check",
                        wheel], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return wheel, venv, tmp


def test_wheel_contains_compiled_extensions(wheel_venv):
    wheel, _, _ = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("slvit_fast/_C_cpu") and n.endswith(".so") for n in names), names
    assert any(n.startswith("slvit_fast/_C_emu") and n.endswith(".so") for n in names), names
    assert "slvit_fast/kernels/__init__.py" in names or any(n.startswith("slvit_fast/kernels/") for n in names)


def test_installed_wheel_reports_backends(wheel_venv):
    _, venv, tmp = wheel_venv
    exe = str(venv / "bin" / "slvit-fast")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([exe, "info", "--json"], capture_output=True, text=True, cwd=str(tmp), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    native = info["native"]
    assert native["cpu"]["compiled"] and native["cpu"]["usable_here"]
    assert native["emu"]["compiled"]
    if native["cuda"]["compiled"]:
        assert {"sm_80", "sm_90"} <= set(native["cuda"]["archs"])
    assert info["backends_cpu"]["cpu"] == "available"
    text = subprocess.run([exe, "info"], capture_output=True, text=True, cwd=str(tmp), env=env).stdout
    assert "slvit_fast._C_cpu" in text and "compiled=yes" in text


def test_installed_wheel_runs_the_cpu_backend_from_the_venv(wheel_venv):
    _, venv, tmp = wheel_venv
    code = (
        "import slvit_fast, torch, os\n"
        "assert os.path.realpath(slvit_fast.__file__).startswith(os.path.realpath(%r)), slvit_fast.__file__\n"
        "m = slvit_fast.SLViTExit.from_preset('resnet152-b1', backend='cpu').eval()\n"
        "ref = slvit_fast.SLViTExit.from_preset('resnet152-b1', backend='torch').eval()\n"
        "ref.load_state_dict(m.state_dict())\n"
        "x = torch.randn(2, 128, 28, 28)\n"
        "torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)\n"
        "print('ok')\n"
    ) % str(venv)
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=str(tmp))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
