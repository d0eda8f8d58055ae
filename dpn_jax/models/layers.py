"""Building blocks shared by every DPN: convolution, PyTorch-exact BatchNorm, BN-act-conv units."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dpn_jax.errors import ConfigError
from dpn_jax.ops.channel_sums import moments, scale_shift
from dpn_jax.ops.conv import conv2d

Dtype = Any
# The compute dtypes a model runs in, by the name settings use (`config.dtype`, `--dtype`).
DTYPES: dict[str, Dtype] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float64": jnp.float64,
}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "elu": nn.elu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


def get_act(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}"
        ) from None


def kernel_init_std(shape: tuple[int, ...]) -> float:
    """He fan-out for conv kernels (HWIO, as torchvision's ResNets), LeCun fan-in for dense ones."""
    if len(shape) == 4:
        return (2.0 / (shape[0] * shape[1] * shape[3])) ** 0.5
    return (1.0 / shape[0]) ** 0.5


def kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.normal(key, shape, dtype) * kernel_init_std(shape)


class Conv2d(nn.Module):
    """Bias-free (by default) conv with PyTorch's symmetric padding and grouped-conv dispatch."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise ConfigError(
                f"{self.name}: {in_features} input channels not divisible by groups={self.groups}"
            )
        kernel = self.param(
            "kernel",
            kernel_init,
            (self.kernel_size, self.kernel_size, in_features // self.groups, self.features),
            jnp.float32,
        )
        y = conv2d(
            x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride, groups=self.groups
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
                self.dtype
            )
        return y


class BatchNorm(nn.Module):
    """BatchNorm whose running statistics follow PyTorch exactly.

    Flax's `nn.BatchNorm` folds the biased batch variance into `var`; PyTorch (and so every timm
    checkpoint) folds the unbiased one. Statistics are reduced in float32 and, under pmap /
    shard_map, averaged over `axis_name` so every replica normalises with the global batch.
    """

    momentum: float = 0.9  # Flax convention: PyTorch momentum 0.1
    epsilon: float = 1e-3
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))

        if train:
            mean, mean_sq = moments(x)
            count = x.size // c
            if self.axis_name is not None:
                mean, mean_sq = lax.pmean((mean, mean_sq), self.axis_name)
                count = count * lax.psum(1, self.axis_name)
            var = jnp.maximum(mean_sq - lax.square(mean), 0.0)
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value

        mul = scale * lax.rsqrt(var + self.epsilon)
        shift = bias - mean * mul
        return scale_shift(x, mul, shift)


def batch_norm_act(
    x: jax.Array, train: bool, act: str, dtype: Dtype, axis_name: str | None
) -> jax.Array:
    """timm's `BatchNormAct2d`: a BatchNorm named `bn` in the calling module, then `act`."""
    x = BatchNorm(dtype=dtype, axis_name=axis_name, name="bn")(x, train)
    return get_act(act)(x)


class BnAct(nn.Module):
    """BatchNorm followed by an activation (timm `BnAct`; params under `bn`)."""

    act: str = "relu"
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return batch_norm_act(x, train, self.act, self.dtype, self.axis_name)


class BnActConv2d(nn.Module):
    """Pre-activation unit BN -> act -> conv (timm `BnActConv2d`; params under `bn` and `conv`)."""

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    act: str = "relu"
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = batch_norm_act(x, train, self.act, self.dtype, self.axis_name)
        return Conv2d(
            features=self.features,
            kernel_size=self.kernel_size,
            stride=self.stride,
            groups=self.groups,
            dtype=self.dtype,
            name="conv",
        )(x)


class ConvBnAct(nn.Module):
    """Post-activation conv -> BN -> act (timm `ConvNormAct`, the stem; params `conv`, `bn`)."""

    features: int
    kernel_size: int
    stride: int = 1
    act: str = "relu"
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv2d(
            features=self.features,
            kernel_size=self.kernel_size,
            stride=self.stride,
            dtype=self.dtype,
            name="conv",
        )(x)
        return batch_norm_act(x, train, self.act, self.dtype, self.axis_name)
