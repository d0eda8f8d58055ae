"""BatchNorm's per-channel sums, with the gradients that need them, lowered per backend.

A training step's BatchNorm reduces each layer's activations four times: sum x and sum x^2 for
the batch statistics, sum dy and sum dy x for the gradients of its scale and shift. XLA CPU runs
each sum as its own pass over memory; dpn_jax's kernel (`csrc/channel_sums_cpu.cc`) takes each
pair in one (BENCHMARKS.md, "The trainer's step"). Other backends, float64, and the "xla" /
"native" lowerings reduce with XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dpn_jax.ops.conv import current_lowering
from dpn_jax.ops.cpu_kernels import cpu_kernels_available, kernel_call


def channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of a, sum of a * b) over every axis but the last, in a's float dtype."""
    axes = tuple(range(a.ndim - 1))
    reduce = lambda a, b: (jnp.sum(a, axes), jnp.sum(a * b, axes))
    if a.dtype != jnp.float32 or current_lowering() != "kernels" or not cpu_kernels_available():
        return reduce(a, b)

    def kernel(a, b):
        c = a.shape[-1]
        sums = kernel_call("dpn_channel_sums", (2, c), a.reshape(-1, c), b.reshape(-1, c))
        return sums[0], sums[1]

    return lax.platform_dependent(a, b, cpu=kernel, default=reduce)


@jax.custom_vjp
def moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and mean square of `x`, in float32 (float64 for float64 `x`).

    The backward pass keeps `x` itself (bfloat16 under mixed precision) and upcasts it again:
    keeping the float32 upcast for every BatchNorm raised a bfloat16 train step's peak memory
    (BENCHMARKS.md, "Memory and rematerialisation").
    """
    x32 = _upcast(x)
    total, total_sq = channel_sums(x32, x32)
    count = x.size // x.shape[-1]
    return total / count, total_sq / count


def _moments_fwd(x):
    return moments(x), x


def _moments_bwd(x, grads):
    grad_mean, grad_mean_sq = grads
    count = x.size // x.shape[-1]
    x32 = _upcast(x)
    dx = (grad_mean + 2 * x32 * grad_mean_sq) / count
    return (dx.astype(x.dtype),)


moments.defvjp(_moments_fwd, _moments_bwd)


@jax.custom_vjp
def scale_shift(x: jax.Array, mul: jax.Array, shift: jax.Array) -> jax.Array:
    """x * mul + shift per channel (`mul` and `shift` float32, cast to x's dtype).

    The gradients of mul and shift are channel sums (of dy x and dy) taken in one pass and in
    float32; autodiff took two passes.
    """
    return x * mul.astype(x.dtype) + shift.astype(x.dtype)


def _scale_shift_fwd(x, mul, shift):
    return scale_shift(x, mul, shift), (x, mul)


def _scale_shift_bwd(residuals, dy):
    x, mul = residuals
    grad_shift, grad_mul = channel_sums(_upcast(dy), _upcast(x))
    return dy * mul.astype(dy.dtype), grad_mul.astype(mul.dtype), grad_shift.astype(mul.dtype)


scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)


def _upcast(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
