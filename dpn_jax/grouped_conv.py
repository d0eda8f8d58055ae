"""The one place where DPN's convolutions are lowered.

XLA's CPU backend runs `feature_group_count` convolutions tens of times slower than oneDNN (and
its weight gradient about a hundred times slower), while cuDNN and TPUs run them natively. Every
convolution of the model goes through `conv2d`, and grouped ones pick their lowering per backend
at lowering time via `lax.platform_dependent`, so one jitted function is right everywhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def symmetric_padding(kernel_size: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch/timm padding `((stride - 1) + (k - 1)) // 2` on both sides ('SAME' is asymmetric)."""
    pad = ((stride - 1) + (kernel_size - 1)) // 2
    return ((pad, pad), (pad, pad))


def _native(x: jax.Array, kernel: jax.Array, stride: int, padding, groups: int) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups)


def _split_groups(x: jax.Array, kernel: jax.Array, stride: int, padding, groups: int) -> jax.Array:
    """One dense convolution per group, concatenated: XLA CPU's dense conv kernels are fast."""
    xs = jnp.split(x, groups, axis=-1)
    ks = jnp.split(kernel, groups, axis=-1)
    return jnp.concatenate([_native(xg, kg, stride, padding, 1) for xg, kg in zip(xs, ks)], axis=-1)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, groups: int = 1,
           padding=None) -> jax.Array:
    """NHWC x HWIO convolution with timm's symmetric padding; grouped lowering chosen per backend.

    `kernel` has shape (kh, kw, in_channels // groups, out_channels), like Flax's `nn.Conv`.
    """
    if padding is None:
        padding = symmetric_padding(kernel.shape[0], stride)
    if groups == 1:
        return _native(x, kernel, stride, padding, 1)
    return lax.platform_dependent(
        x, kernel,
        cpu=lambda x, k: _split_groups(x, k, stride, padding, groups),
        default=lambda x, k: _native(x, k, stride, padding, groups))
