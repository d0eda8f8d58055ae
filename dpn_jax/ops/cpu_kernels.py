"""dpn_jax's CPU kernels (`csrc/`): which build to load, loading it, calling its XLA FFI targets.

`pip install` builds the kernels (setup.py) into two shared libraries: `_cpu_kernels` for the
architecture's baseline, and on x86-64 `_cpu_kernels_avx2` for AVX2 + FMA. Separate libraries,
so that no code compiled for AVX2 can run on the baseline path. The building machine's CPU plays
no part; the running one decides, as the baseline library reports it (`DpnCpuSupportsAvx2Fma`).
Both builds compute the same sums in the same order, but only the AVX2 one fuses multiply-adds,
so their results differ by float32 rounding.

`DPN_JAX_CPU_KERNELS` chooses:
    auto (default)                  the AVX2 + FMA build where the CPU has both, else the baseline
    baseline                        the baseline build
    off (or 0, no, false, none)     neither: CPU convolutions take the pure-XLA lowering
The extension is optional: where it was not built (no GCC >= 12 or Clang at install), or is
switched off, CPU runs warn once and take the slower pure-XLA lowering. The libraries also hold
the input pipeline's resize (`dpn_jax.ops.resize`), chosen the same way.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import warnings

import jax
import numpy as np

from dpn_jax.errors import ConfigError
from dpn_jax.system.env_switches import switched_off

CPU_KERNELS_ENV = "DPN_JAX_CPU_KERNELS"
BASELINE_LIBRARY = "dpn_jax.ops._cpu_kernels"
AVX2_LIBRARY = "dpn_jax.ops._cpu_kernels_avx2"
# custom-call target -> the libraries' handler symbol
TARGETS = {
    "dpn_grouped_conv_forward": "DpnGroupedConvForward",
    "dpn_grouped_conv_input_grad": "DpnGroupedConvInputGrad",
    "dpn_grouped_conv_kernel_grad": "DpnGroupedConvKernelGrad",
    "dpn_pointwise_kernel_grad": "DpnPointwiseKernelGrad",
    "dpn_channel_sums": "DpnChannelSums",
}
_SLOWER_LOWERING = "; using the slower pure-XLA lowering"


def cpu_kernel_targets() -> tuple[str, ...]:
    """The custom-call targets the "kernels" lowering may emit (`jax.export` must allow them)."""
    return tuple(TARGETS)


def built_library(module: str) -> str | None:
    """The path of a kernel library this install built, else None."""
    spec = importlib.util.find_spec(module)
    return spec.origin if spec is not None else None


def cpu_supports_avx2_fma(baseline_library: str) -> bool:
    """Whether this CPU (and OS) can run the AVX2 + FMA build, as the baseline build tells."""
    return bool(ctypes.CDLL(baseline_library).DpnCpuSupportsAvx2Fma())


def chosen_library() -> str | None:
    """The kernel library to load per `$DPN_JAX_CPU_KERNELS` and the CPU; None (and a warning
    on a CPU backend) where the kernels are switched off or were not built."""
    library, why_not = selected_library()
    if library is None:
        _warn_on_cpu(why_not)
    return library


def selected_library() -> tuple[str | None, str]:
    """`chosen_library` without the warning: (the library, "") or (None, why there is none),
    also for users of the libraries' other functions (`dpn_jax.ops.resize`)."""
    setting = os.environ.get(CPU_KERNELS_ENV, "auto")
    if switched_off(setting):
        return None, (
            f"dpn_jax's CPU convolution kernels are switched off ({CPU_KERNELS_ENV}={setting!r})"
        )
    setting = setting.strip().lower()
    if setting not in ("auto", "baseline"):
        raise ConfigError(f"{CPU_KERNELS_ENV}={setting!r}: expected auto, baseline or off")
    baseline = built_library(BASELINE_LIBRARY)
    if baseline is None:
        return None, (
            "dpn_jax's CPU convolution kernels were not built (the install found no "
            "GCC >= 12 or Clang)"
        )
    avx2 = built_library(AVX2_LIBRARY) if setting == "auto" else None
    return (avx2 if avx2 is not None and cpu_supports_avx2_fma(baseline) else baseline), ""


def _warn_on_cpu(why: str) -> None:
    if jax.default_backend() == "cpu":
        warnings.warn(why + _SLOWER_LOWERING, stacklevel=3)


def register_targets(library: str, suffix: str = "") -> None:
    """Registers the library's handlers with XLA as CPU custom-call targets `TARGETS` + suffix
    (a suffix lets a test or benchmark load a second build beside the chosen one)."""
    handlers = ctypes.CDLL(library)
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(
            target + suffix, jax.ffi.pycapsule(getattr(handlers, symbol)), platform="cpu"
        )


@functools.cache
def cpu_kernels_available() -> bool:
    """Registers the chosen build of the CPU kernels with XLA once; False where there is none."""
    library = chosen_library()
    if library is None:
        return False
    register_targets(library)
    return True


def kernel_call(
    target: str, result_shape, a: jax.Array, b: jax.Array, **attributes: int
) -> jax.Array:
    """One kernel product, `target`(a, b; attributes), as a float32 `result_shape` array.

    `a` is the activation: the result varies over shard_map's axes as it does.
    """
    if not cpu_kernels_available():  # registers the targets before any call is lowered
        raise RuntimeError("dpn_jax's CPU convolution kernels are not available")
    result = jax.typeof(a).update(shape=tuple(result_shape))
    return jax.ffi.ffi_call(target, result, vmap_method="sequential")(
        a, b, **{name: np.int64(value) for name, value in attributes.items()}
    )
