"""CPU lowerings of `conv2d` equal XLA's native convolution, forward and backward.

Both CPU lowerings of the grouped 3x3 convolution are checked on their own (dpn_jax's FFI
kernels, narrow groups merged, and one dense convolution per super-group) as well as through
`conv2d`, which routes each shape to one of them; so is the 1x1 convolution's weight-gradient
kernel. The kernels are an optional extension: the tests that need them skip where they were not
built or are switched off (`DPN_JAX_CPU_KERNELS=off`); the rest check the pure-XLA lowerings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dpn_jax.models.dpn import MODEL_CONFIGS, stage_widths
from dpn_jax.ops import conv, cpu_kernels
from dpn_jax.ops.conv import conv2d, cpu_kernel_merge, groups_per_cpu_conv, symmetric_padding

requires_kernels = pytest.mark.skipif(
    not cpu_kernels.cpu_kernels_available(),
    reason="dpn_jax's CPU kernels (an optional extension) are not built or are switched off",
)


def _variant_group_shapes() -> list[tuple[int, int]]:
    """Every (channels per group, groups) pair of the 3x3 convs of the registered variants."""
    pairs = set()
    for config in MODEL_CONFIGS.values():
        for stage in range(4):
            _, r = stage_widths(config.small, config.k_r, stage)
            pairs.add((r // config.groups, config.groups))
    return sorted(pairs)


def _test_shapes() -> list[tuple[int, int]]:
    """Each variant pair shrunk to two CPU super-groups (same merge, fast to compile)."""
    shapes = set()
    for cg, groups in _variant_group_shapes():
        merge = groups_per_cpu_conv(cg, groups)
        assert groups_per_cpu_conv(cg, 2 * merge) == merge
        shapes.add((cg, 2 * merge))
    return sorted(shapes)


def _reference(x, kernel, stride, groups, pad=None):
    padding = (
        symmetric_padding(kernel.shape[0], stride) if pad is None else ((pad, pad), (pad, pad))
    )
    return lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def _value_and_vjp(fn, x, kernel, cotangent):
    y, vjp = jax.vjp(fn, x, kernel)
    return (y, *vjp(cotangent))


def _assert_matches_reference(x, kernel, stride, groups, lowering=None, pad=None):
    """`lowering(x, kernel)` (default: `conv2d`) against `feature_group_count`, with its VJP;
    timm's padding unless `pad` is given."""
    ours = lowering or (lambda x, k: conv2d(x, k, stride=stride, groups=groups))
    ref = lambda x, k: _reference(x, k, stride, groups, pad)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(ref, x, kernel).shape)
    got = jax.jit(lambda x, k, c: _value_and_vjp(ours, x, k, c))(x, kernel, cotangent)
    assert got[0].shape == cotangent.shape
    want = jax.jit(lambda x, k, c: _value_and_vjp(ref, x, k, c))(x, kernel, cotangent)
    for name, g, w in zip(("output", "input gradient", "kernel gradient"), got, want):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), rtol=0, atol=2e-6 * scale, err_msg=name
        )


def _random_inputs(channels_per_group, groups, seed, height, width):
    """A (2, height, width, C) input and a (3, 3, channels_per_group, C) kernel."""
    channels = channels_per_group * groups
    kx, kk = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (2, height, width, channels))
    return x, jax.random.normal(kk, (3, 3, channels_per_group, channels)) * 0.1


def test_variant_shapes_cover_every_channels_per_group():
    cgs = {cg for cg, _ in _variant_group_shapes()}
    assert cgs == {3, 4, 6, 8, 12, 16, 24, 32}


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_per_group,groups", _test_shapes())
def test_grouped_3x3_matches_feature_group_count(channels_per_group, groups, stride):
    x, kernel = _random_inputs(channels_per_group, groups, channels_per_group * 100 + groups, 7, 7)
    _assert_matches_reference(x, kernel, stride, groups)


def _kernel_merge(channels_per_group, groups):
    x, kernel = (
        jnp.zeros((1, 1, 1, channels_per_group * groups)),
        jnp.zeros((3, 3, channels_per_group, channels_per_group * groups)),
    )
    return cpu_kernel_merge(x, kernel, groups)


def _kernel_test_shapes() -> list[tuple[int, int, int]]:
    """(channels per group, groups, merge) of each variant pair, shrunk to two kernel blocks."""
    shapes = set()
    for cg, groups in _variant_group_shapes():
        merge = _kernel_merge(cg, groups)
        per_block = max(1, 8 // (merge * cg))  # merged groups sharing one 8-lane vector (shuffle)
        shapes.add((cg, 2 * merge * per_block, merge))
    return sorted(shapes)


def test_cpu_kernels_take_every_variant_width():
    """dpn92's 3, 6 and 12 channels per group merged into groups of 24; others as they are."""
    merges = {cg: merge for cg, _, merge in _kernel_test_shapes()}
    assert merges == {3: 8, 4: 1, 6: 4, 8: 1, 12: 2, 16: 1, 24: 1, 32: 1}
    x, kernel = jnp.zeros((1, 8, 8, 64)), jnp.zeros((3, 3, 4, 64))
    assert cpu_kernel_merge(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), 16) is None
    assert _kernel_merge(5, 3) is None  # 5, 10 and 15 channels: no layout, the split lowering


def _lowers_to(target, fn, *args):
    return target in jax.jit(fn).lower(*args).as_text()


@requires_kernels
@pytest.mark.parametrize(
    "channels,channels_per_group,stride,dtype,uses_kernels",
    [
        (64, 4, 1, jnp.float32, True),
        (48, 3, 1, jnp.float32, True),  # 3: merged into 24
        (64, 4, 2, jnp.float32, True),
        (64, 4, 3, jnp.float32, True),
        (64, 4, 4, jnp.float32, False),  # stride 4 (pad 2): beyond the kernels' geometries
        (64, 4, 1, jnp.bfloat16, False),
    ],
)
def test_conv2d_runs_the_kernels_where_they_take_the_shape(
    channels, channels_per_group, stride, dtype, uses_kernels
):
    x = jnp.zeros((1, 9, 9, channels), dtype)
    kernel = jnp.zeros((3, 3, channels_per_group, channels), dtype)
    conv = lambda x, k: conv2d(x, k, stride=stride, groups=channels // channels_per_group)
    assert _lowers_to("dpn_grouped_conv_forward", conv, x, kernel) == uses_kernels


def test_stride_beyond_the_kernels_matches_feature_group_count():
    """Stride 4 (timm pads 2): the split lowering, as for any geometry the kernels refuse."""
    x, kernel = _random_inputs(4, 16, 44, 9, 10)
    _assert_matches_reference(x, kernel, 4, 16)


def test_without_the_library_cpu_runs_the_split_lowering(monkeypatch):
    """An install that could not compile the kernels still works on CPU, and says so."""
    monkeypatch.setattr(cpu_kernels, "built_library", lambda module: None)
    monkeypatch.delenv(cpu_kernels.CPU_KERNELS_ENV, raising=False)
    with pytest.warns(UserWarning, match="kernels were not built"):
        assert not cpu_kernels.cpu_kernels_available.__wrapped__()
    monkeypatch.setattr(conv, "cpu_kernels_available", lambda: False)
    x, kernel = jnp.zeros((1, 5, 5, 40)), jnp.zeros((3, 3, 8, 40))  # a shape no other test traces
    assert not _lowers_to("dpn_grouped_conv", lambda x, k: conv2d(x, k, groups=5), x, kernel)


@requires_kernels
@pytest.mark.parametrize("size", [1, 6, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_per_group,groups,merge", _kernel_test_shapes())
def test_cpu_kernel_matches_feature_group_count(channels_per_group, groups, merge, stride, size):
    """Odd and even sizes (stride 2's phases), and a 1x1 image (every tap but one is padding)."""
    x, kernel = _random_inputs(
        channels_per_group, groups, channels_per_group * 10 + size, size, size + 1
    )
    lowering = lambda x, k: conv._merged_kernel_conv(x, k, stride, 1, groups, merge)
    _assert_matches_reference(x, kernel, stride, groups, lowering)


@requires_kernels
@pytest.mark.parametrize(
    "stride,pad,channels_per_group,groups",
    [  # shuffle and broadcast layouts
        (1, 0, 4, 4),
        (1, 2, 8, 2),
        (2, 0, 8, 2),
        (2, 2, 4, 4),
        (3, 0, 4, 4),
        (3, 1, 8, 2),
        (3, 2, 8, 2),
    ],
)
def test_cpu_kernel_takes_every_stride_and_padding_it_accepts(
    stride, pad, channels_per_group, groups
):
    """Beyond timm's (stride 1 or 2, pad 1): every geometry the kernels' shape check lets in."""
    x, kernel = _random_inputs(channels_per_group, groups, 10 * stride + pad, 8, 7)
    lowering = lambda x, k: conv._merged_kernel_conv(x, k, stride, pad, groups, 1)
    _assert_matches_reference(x, kernel, stride, groups, lowering, pad)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_per_group,groups", _test_shapes())
def test_split_groups_matches_feature_group_count(channels_per_group, groups, stride):
    x, kernel = _random_inputs(
        channels_per_group, groups, channels_per_group * 100 + groups + 1, 7, 7
    )
    lowering = lambda x, k: conv._split_groups(x, k, stride, symmetric_padding(3, stride), groups)
    _assert_matches_reference(x, kernel, stride, groups, lowering)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_dense_conv_matches_reference(kernel_size, stride):
    kx, kk = jax.random.split(jax.random.PRNGKey(kernel_size + 10 * stride))
    x = jax.random.normal(kx, (2, 9, 9, 24))
    kernel = jax.random.normal(kk, (kernel_size, kernel_size, 24, 40)) * 0.1
    _assert_matches_reference(x, kernel, stride, 1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "batch,size,in_channels,out_channels",
    [
        (1, 1, 5, 3),  # a single row: every register tile is a partial one
        (2, 23, 13, 21),  # 1058 rows (three work items, the last partial), odd channel counts
        (2, 16, 144, 80),
    ],
)  # a dpn68 stage-2 width
def test_pointwise_kernel_gradient_matches_reference(
    batch, size, in_channels, out_channels, stride
):
    """The 1x1 conv's CPU weight-gradient kernel, through `conv2d`'s VJP, against XLA's conv."""
    kx, kk = jax.random.split(jax.random.PRNGKey(size + in_channels))
    x = jax.random.normal(kx, (batch, size, size, in_channels))
    kernel = jax.random.normal(kk, (1, 1, in_channels, out_channels)) * 0.1
    _assert_matches_reference(x, kernel, stride, 1)
    if cpu_kernels.cpu_kernels_available():  # else this checks XLA's own weight gradient
        grad = jax.grad(lambda x, k: jnp.sum(conv2d(x, k, stride=stride) ** 2), argnums=1)
        assert _lowers_to("dpn_pointwise_kernel_grad", grad, x, kernel)


@requires_kernels
def test_pointwise_kernel_past_the_routing_limit():
    """The kernel itself takes any width (the limit is a speed choice): 300 outputs, 600 rows."""
    kx, kd = jax.random.split(jax.random.PRNGKey(7))
    x, dy = jax.random.normal(kx, (600, 7)), jax.random.normal(kd, (600, 300))
    got = cpu_kernels.kernel_call("dpn_pointwise_kernel_grad", (7, 300), x, dy)
    want = lax.dot_general(x, dy, (((0,), (0,)), ((), ())))
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(want)))
    )


@requires_kernels
def test_wide_pointwise_gradient_stays_with_xla():
    """Past POINTWISE_KERNEL_MAX_OUT output channels XLA's matmul is the faster weight gradient."""
    x = jnp.zeros((1, 4, 4, 8))
    grad = jax.grad(lambda x, k: jnp.sum(conv2d(x, k)), argnums=1)
    for out_channels, uses_kernel in (
        (conv.POINTWISE_KERNEL_MAX_OUT, True),
        (conv.POINTWISE_KERNEL_MAX_OUT + 8, False),
    ):
        kernel = jnp.zeros((1, 1, 8, out_channels))
        assert _lowers_to("dpn_pointwise_kernel_grad", grad, x, kernel) == uses_kernel


@pytest.mark.parametrize(
    "channels_per_group,groups,merged",
    [(4, 32, 4), (3, 32, 8), (4, 50, 5), (8, 32, 2), (16, 32, 1), (32, 40, 1), (2, 3, 3)],
)
def test_groups_per_cpu_conv(channels_per_group, groups, merged):
    assert groups_per_cpu_conv(channels_per_group, groups) == merged
