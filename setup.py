"""Builds dpn_jax's CPU kernels (grouped 3x3 convolution, 1x1 weight gradient) against
jaxlib's XLA FFI headers.

Everything else about the package is in pyproject.toml. The kernels are one plain shared library
(no Python module init), loaded with ctypes by `dpn_jax.ops.conv`. The build needs GCC >= 12
or Clang; it is optional: without it, CPU runs fall back to a slower pure-XLA lowering (and say so).
"""
import os
import platform

import jaxlib
from setuptools import Extension, setup


def _cpu_flags() -> list[str]:
    """AVX2 + FMA where the building machine has them (the kernels' 8-lane vectors)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if " avx2" in flags and " fma" in flags else []


setup(ext_modules=[Extension(
    "dpn_jax.ops._cpu_kernels",
    sources=["dpn_jax/ops/csrc/grouped_conv_cpu.cc", "dpn_jax/ops/csrc/pointwise_grad_cpu.cc"],
    depends=["dpn_jax/ops/csrc/cpu_kernels.h"],
    include_dirs=[os.path.join(os.path.dirname(os.path.abspath(jaxlib.__file__)), "include")],
    extra_compile_args=["-std=c++17", "-O3", *_cpu_flags()],
    language="c++",
    optional=True,
)])
