"""CPU lowerings of `conv2d` equal XLA's native convolution, forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dpn_jax.dpn import MODEL_ARGS, stage_widths
from dpn_jax.grouped_conv import conv2d, groups_per_cpu_conv, symmetric_padding


def _variant_group_shapes() -> list[tuple[int, int]]:
    """Every (channels per group, groups) pair of the 3x3 convs of the registered variants."""
    pairs = set()
    for args in MODEL_ARGS.values():
        for stage in range(4):
            _, r = stage_widths(args.get("small", False), args["k_r"], stage)
            pairs.add((r // args["groups"], args["groups"]))
    return sorted(pairs)


def _test_shapes() -> list[tuple[int, int]]:
    """Each variant pair shrunk to two CPU super-groups (same merge, fast to compile)."""
    shapes = set()
    for cg, groups in _variant_group_shapes():
        merge = groups_per_cpu_conv(cg, groups)
        assert groups_per_cpu_conv(cg, 2 * merge) == merge
        shapes.add((cg, 2 * merge))
    return sorted(shapes)


def _reference(x, kernel, stride, groups):
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), symmetric_padding(kernel.shape[0], stride),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _value_and_vjp(fn, x, kernel, cotangent):
    y, vjp = jax.vjp(fn, x, kernel)
    return (y, *vjp(cotangent))


def _assert_matches_reference(x, kernel, stride, groups):
    ours = jax.jit(lambda x, k: conv2d(x, k, stride=stride, groups=groups))
    ref = lambda x, k: _reference(x, k, stride, groups)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(ref, x, kernel).shape)
    got = jax.jit(lambda x, k, c: _value_and_vjp(ours, x, k, c))(x, kernel, cotangent)
    want = jax.jit(lambda x, k, c: _value_and_vjp(ref, x, k, c))(x, kernel, cotangent)
    for name, g, w in zip(("output", "input gradient", "kernel gradient"), got, want):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=2e-6 * scale,
                                   err_msg=name)


def test_variant_shapes_cover_every_channels_per_group():
    cgs = {cg for cg, _ in _variant_group_shapes()}
    assert cgs == {3, 4, 6, 8, 12, 16, 24, 32}


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_per_group,groups", _test_shapes())
def test_grouped_3x3_matches_feature_group_count(channels_per_group, groups, stride):
    channels = channels_per_group * groups
    kx, kk = jax.random.split(jax.random.PRNGKey(channels_per_group * 100 + groups))
    x = jax.random.normal(kx, (2, 7, 7, channels))
    kernel = jax.random.normal(kk, (3, 3, channels_per_group, channels)) * 0.1
    _assert_matches_reference(x, kernel, stride, groups)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_dense_conv_matches_reference(kernel_size, stride):
    kx, kk = jax.random.split(jax.random.PRNGKey(kernel_size + 10 * stride))
    x = jax.random.normal(kx, (2, 9, 9, 24))
    kernel = jax.random.normal(kk, (kernel_size, kernel_size, 24, 40)) * 0.1
    _assert_matches_reference(x, kernel, stride, 1)


@pytest.mark.parametrize("channels_per_group,groups,merged", [
    (4, 32, 4), (3, 32, 8), (4, 50, 5), (8, 32, 2), (16, 32, 1), (32, 40, 1), (2, 3, 3)])
def test_groups_per_cpu_conv(channels_per_group, groups, merged):
    assert groups_per_cpu_conv(channels_per_group, groups) == merged
