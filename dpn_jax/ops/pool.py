"""Max pooling (NHWC, square window, -inf padding) whose gradient is PyTorch's, bit for bit.

JAX differentiates a `reduce_window` max through a variadic reduce-window that carries int32
window indices; XLA CPU runs it as the slowest single op of a dpn92 train step (BENCHMARKS.md,
"The trainer's step"). Here the forward pass also records, as int8, which tap of each window
won - the first maximum in row-major order, as `torch.nn.functional.max_pool2d` picks it - and
the backward pass routes each output's gradient there with strided pads, summed in PyTorch's
order: the same gradient as PyTorch's, bit for bit. Without differentiation (inference, export)
it is the plain `reduce_window`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """Max over `window` x `window` windows of the (N, H, W, C) `x`, `stride` apart, its height
    and width padded by `padding` with -inf."""
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, pads)


def _max_pool_fwd(x, window, stride, padding):
    taps = _taps(x, window, stride, padding)
    index = jnp.int8 if len(taps) <= 127 else jnp.int32
    running, first = taps[0], jnp.zeros(taps[0].shape, index)
    for k, tap in enumerate(taps[1:], 1):
        better = tap > running  # strictly: the first maximum keeps the gradient
        running = jnp.maximum(running, tap)  # NaN in, NaN out, as reduce_window's max
        first = jnp.where(better, index(k), first)
    return running, (first, x.shape)


def _max_pool_bwd(window, stride, padding, residuals, grad):
    first, (_, height, width, _) = residuals
    span_h, span_w = (_span(n, stride) for n in grad.shape[1:3])
    padded_h, padded_w = height + 2 * padding, width + 2 * padding
    zero = jnp.zeros((), grad.dtype)
    total = None
    # Taps from the last to the first: an input in several windows then sums its gradients in
    # the order of the outputs, as PyTorch's backward does.
    for k in reversed(range(window * window)):
        i, j = divmod(k, window)
        spread = (
            (0, 0, 0),
            (i, padded_h - i - span_h, stride - 1),
            (j, padded_w - j - span_w, stride - 1),
            (0, 0, 0),
        )
        part = lax.pad(jnp.where(first == k, grad, zero), zero, spread)
        total = part if total is None else total + part
    return (total[:, padding : padding + height, padding : padding + width, :],)


def _taps(x: jax.Array, window: int, stride: int, padding: int) -> list[jax.Array]:
    """The window's taps in row-major order: tap (i, j) holds x[oh * stride + i - padding,
    ow * stride + j - padding] (-inf outside) at every output position (oh, ow)."""
    n, height, width, c = x.shape
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    padded = jnp.pad(x, pads, constant_values=-jnp.inf)
    span_h, span_w = (
        _span((size + 2 * padding - window) // stride + 1, stride) for size in (height, width)
    )
    return [
        lax.slice(padded, (0, i, j, 0), (n, i + span_h, j + span_w, c), (1, stride, stride, 1))
        for i in range(window)
        for j in range(window)
    ]


def _span(outputs: int, stride: int) -> int:
    """How many padded rows (columns) `outputs` windows' first taps stretch over."""
    return (outputs - 1) * stride + 1


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
