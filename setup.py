"""Builds dpn_jax's CPU kernels (grouped 3x3 convolution, 1x1 weight gradient, BatchNorm's
channel sums, and Pillow's resize for the input pipeline) against jaxlib's XLA FFI headers.

Everything else about the package is in pyproject.toml. The kernels are plain shared libraries
(no Python module init), loaded with ctypes by `dpn_jax.ops.cpu_kernels`, built twice from the
same sources:
  - `_cpu_kernels`, for the architecture's baseline (any x86-64 CPU);
  - `_cpu_kernels_avx2`, on x86-64 only, for AVX2 + FMA; the loader takes it only where the
    running CPU has both (`DPN_JAX_CPU_KERNELS=baseline` forces the other).
Nothing depends on the building machine's CPU, so a wheel built here runs on any CPU of its
architecture. The build needs GCC >= 12 or Clang; it is optional: without it, CPU runs fall back
to a slower pure-XLA lowering (and say so).
"""

import os
import platform
import sys

import jaxlib
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "dpn_jax/ops/csrc"
# Hidden symbols, and (ELF) references bound inside the library: nothing but the handlers is
# exported, and neither build, both loaded in one process, ever calls the other's (differently
# compiled) inline functions or standard-library instantiations.
COMPILE_ARGS = [
    "-std=c++17",
    "-O3",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-Wno-psabi",
]  # psabi: 8-float vectors passed without AVX, inside the library
LINK_ARGS = ["-Wl,-Bsymbolic"] if sys.platform.startswith("linux") else []


def kernel_library(name: str, instruction_sets: list[str]) -> Extension:
    return Extension(
        f"dpn_jax.ops.{name}",
        sources=[
            f"{CSRC}/channel_sums_cpu.cc",
            f"{CSRC}/grouped_conv_cpu.cc",
            f"{CSRC}/pointwise_grad_cpu.cc",
            f"{CSRC}/cpu_features.cc",
            f"{CSRC}/resize_cpu.cc",
        ],
        depends=[f"{CSRC}/cpu_kernels.h"],
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(jaxlib.__file__)), "include")],
        extra_compile_args=[*COMPILE_ARGS, *instruction_sets],
        extra_link_args=LINK_ARGS,
        language="c++",
        optional=True,
    )


class BuildEachInItsOwnDirectory(build_ext):
    """Both builds compile the same sources: each needs its own object files."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.parallel = None  # build_extension swaps self.build_temp: one extension at a time

    def build_extension(self, ext: Extension) -> None:
        shared = self.build_temp
        self.build_temp = os.path.join(shared, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared


libraries = [kernel_library("_cpu_kernels", [])]
if platform.machine().lower() in ("x86_64", "amd64"):
    libraries.append(kernel_library("_cpu_kernels_avx2", ["-mavx2", "-mfma"]))

setup(ext_modules=libraries, cmdclass={"build_ext": BuildEachInItsOwnDirectory})
