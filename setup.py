"""Build script: the pure-Python package plus, when possible, the native extensions in csrc/.

- ``kernels/`` (Triton) ships inside the wheel as ``slvit_fast.kernels``.
- Native extensions are built by ``csrc/native_build.py`` when torch and a C++ compiler are present
  (CUDA when a CUDA build of torch and nvcc are found as well). Without them the package installs
  pure-Python and says so. ``SLVIT_FAST_SKIP_NATIVE=1`` skips the native build on purpose.
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from native_build import native_build_options  # noqa: E402  (build-time helper in csrc/, not installed)

packages = find_packages(include=["slvit_fast", "slvit_fast.*"]) + ["slvit_fast.kernels"]

setup(
    packages=packages,
    package_dir={"slvit_fast.kernels": "kernels"},
    include_package_data=False,
    **native_build_options(),
)
