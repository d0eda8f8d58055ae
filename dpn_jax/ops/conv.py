"""The one place where DPN's convolutions are lowered.

XLA's CPU backend runs `feature_group_count` convolutions far slower than oneDNN (their weight
gradient slowest of all), and even a dense 1x1 convolution's weight gradient is slower than the
same contraction written as a `dot_general`. cuDNN and TPUs run all of them natively. Every
convolution of the model goes through `conv2d`, which picks the lowering per backend at lowering
time via `lax.platform_dependent`, so one jitted function is right everywhere. On CPU the 3x3
grouped convolutions run dpn_jax's own kernels (`csrc/grouped_conv_cpu.cc`, XLA FFI custom calls
loaded by `cpu_kernels.py`; narrow groups merged into block-diagonal ones they take), else
(bfloat16, no kernels built, or `DPN_JAX_CPU_KERNELS=off`) one dense convolution per
super-group, and 1x1 convolutions are matmuls whose weight gradient is a kernel of its own
(`csrc/pointwise_grad_cpu.cc`). BENCHMARKS.md ("CPU kernels") has the current measurements,
benchmarks/HISTORY.md the ones behind each CPU choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from dpn_jax.errors import ConfigError
from dpn_jax.ops.cpu_kernels import cpu_kernels_available, kernel_call

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# On CPU, a dense convolution narrower than this many input channels wastes most of its time on
# overhead; merging neighbouring groups into one block-diagonal convolution of at least this width
# (extra zero FLOPs included) is faster forward and backward for 3-4 channels/group
# (benchmarks/HISTORY.md, "3x3 grouped convolution").
MIN_CPU_CONV_CHANNELS = 16


def symmetric_padding(kernel_size: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch/timm padding `((stride - 1) + (k - 1)) // 2` on both sides ('SAME' is asymmetric)."""
    pad = ((stride - 1) + (kernel_size - 1)) // 2
    return ((pad, pad), (pad, pad))


def _native(x: jax.Array, kernel: jax.Array, stride: int, padding, groups: int) -> jax.Array:
    return lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        padding,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
    )


def _pointwise_dot(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """An unpadded 1x1 convolution as a matmul over channels (its gradients are matmuls too)."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    return _channel_matmul(x, kernel[0, 0])


# The 1x1 weight gradient's transposed copy costs XLA ~1/out_channels of the product's work;
# up to this width dpn_jax's kernel (no copy) is the faster one in a dpn68 train step, beyond it
# XLA's matmul (benchmarks/HISTORY.md, "CPU 1x1 weight-gradient kernel").
POINTWISE_KERNEL_MAX_OUT = 256


@jax.custom_vjp
def _channel_matmul(x: jax.Array, weight: jax.Array) -> jax.Array:
    """(N, H, W, Cin) x (Cin, Cout) -> (N, H, W, Cout).

    The custom VJP states the weight gradient as x^T dy contracted over (N, H, W). Autodiff's
    form makes XLA CPU transpose dy in memory first, which slowed a dpn68 training step's
    56x56 and 28x28 layers (benchmarks/HISTORY.md, "1x1 convolution gradient"); even this form
    makes it write x transposed. dpn_jax's own kernel transposes in cache instead; it pays
    where that copy is large against the product's FLOPs, i.e. for few output channels.
    """
    return lax.dot_general(x, weight, (((3,), (0,)), ((), ())))


def _channel_matmul_fwd(x, weight):
    return _channel_matmul(x, weight), (x, weight)


def _channel_matmul_bwd(residuals, dy):
    x, weight = residuals
    dx = lax.dot_general(dy, weight, (((3,), (1,)), ((), ())))
    if (
        weight.shape[1] <= POINTWISE_KERNEL_MAX_OUT
        and x.dtype == dy.dtype == jnp.float32
        and cpu_kernels_available()
    ):
        dweight = kernel_call(
            "dpn_pointwise_kernel_grad",
            weight.shape,
            x.reshape(-1, x.shape[-1]),
            dy.reshape(-1, dy.shape[-1]),
        )
    else:
        dweight = lax.dot_general(x, dy, (((0, 1, 2), (0, 1, 2)), ((), ())))
    return dx, dweight


_channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def groups_per_cpu_conv(channels_per_group: int, groups: int) -> int:
    """How many groups `_split_groups` merges into one dense convolution on CPU.

    The smallest divisor `m` of `groups` with `m * channels_per_group >= MIN_CPU_CONV_CHANNELS`
    (1 when a group is already that wide): dpn68's 4 channels/group -> 4, dpn92's 3 -> 8.
    """
    for m in range(1, groups + 1):
        if groups % m == 0 and m * channels_per_group >= MIN_CPU_CONV_CHANNELS:
            return m
    return groups


def block_diagonal_kernels(kernel: jax.Array, groups: int, merge: int) -> jax.Array:
    """(kh, kw, cg, G*og) grouped kernel -> (G/merge, kh, kw, merge*cg, merge*og) dense kernels.

    Super-group s is the dense kernel of groups s*merge .. (s+1)*merge-1 with zeros off the
    diagonal blocks, so a dense conv on its input channels equals those groups' grouped conv.
    """
    kh, kw, cg, out_channels = kernel.shape
    og = out_channels // groups
    blocks = kernel.reshape(kh, kw, cg, groups // merge, merge, og)
    eye = jnp.eye(merge, dtype=kernel.dtype)
    dense = jnp.einsum("hwcsmo,nm->shwncmo", blocks, eye)
    return dense.reshape(groups // merge, kh, kw, merge * cg, merge * og)


def _super_group_kernels(kernel: jax.Array, groups: int) -> jax.Array:
    """The (S, kh, kw, cin, cout) dense kernels of `_split_groups`' S super-groups."""
    merge = groups_per_cpu_conv(kernel.shape[2], groups)
    if merge > 1:
        return block_diagonal_kernels(kernel, groups, merge)
    return jnp.moveaxis(kernel.reshape(*kernel.shape[:3], groups, -1), 3, 0)


def _split_groups(x: jax.Array, kernel: jax.Array, stride: int, padding, groups: int) -> jax.Array:
    """One dense convolution per (super-)group, concatenated: XLA CPU's dense convs are fast."""
    kernels = _super_group_kernels(kernel, groups)
    xs = jnp.split(x, len(kernels), axis=-1)
    return jnp.concatenate(
        [_native(xg, kg, stride, padding, 1) for xg, kg in zip(xs, kernels)], axis=-1
    )


def _kernel_layout_exists(in_per_group: int, out_per_group: int, channels: int) -> bool:
    """`csrc/grouped_conv_cpu.cc`'s `ChooseLayout`: the group widths it vectorises.

    Groups of 8, 16, 24 or 32 output channels, or of 1, 2 or 4 channels in and out filling
    8-lane vectors.
    """
    return (out_per_group % 8 == 0 and out_per_group <= 32) or (
        in_per_group == out_per_group and 8 % out_per_group == 0 and channels % 8 == 0
    )


def _kernel_geometry_exists(stride: int, pad: int) -> bool:
    """`csrc/grouped_conv_cpu.cc`'s `CheckConv`: the strides and (symmetric) paddings it takes."""
    return 1 <= stride <= 3 and 0 <= pad <= 2


def cpu_kernel_merge(x: jax.Array, kernel: jax.Array, groups: int) -> int | None:
    """How many neighbouring groups the CPU kernels run as one (1: each as is); None: they can't.

    dpn68/98/107/131's 4, 8, 16 and 32 and dpn92's 24 channels per group run as they are;
    dpn92's 3, 6 and 12 run as block-diagonal groups of 24 (8, 4 and 2 merged, that many times
    the FLOPs), still faster than the split lowering (BENCHMARKS.md, "CPU kernels").
    Only float32 3x3 kernels.
    """
    if kernel.shape[:2] != (3, 3) or x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        return None
    in_per_group, out_per_group = kernel.shape[2], kernel.shape[3] // groups
    for merge in range(1, groups + 1):
        if groups % merge == 0 and _kernel_layout_exists(
            merge * in_per_group, merge * out_per_group, kernel.shape[3]
        ):
            return merge
    return None


def _grouped_call(
    product: str, result_shape, a: jax.Array, b: jax.Array, groups: int, stride: int, pad: int
) -> jax.Array:
    return kernel_call(
        f"dpn_grouped_conv_{product}", result_shape, a, b, groups=groups, stride=stride, pad=pad
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_kernel_conv(
    x: jax.Array, kernel: jax.Array, stride: int, pad: int, groups: int
) -> jax.Array:
    """The 3x3 grouped conv as one custom call per product (jax.export needs them allowed)."""
    n, h, w, _ = x.shape
    out = (n, (h + 2 * pad - 3) // stride + 1, (w + 2 * pad - 3) // stride + 1, kernel.shape[3])
    return _grouped_call("forward", out, x, kernel, groups, stride, pad)


def _cpu_kernel_conv_fwd(x, kernel, stride, pad, groups):
    return _cpu_kernel_conv(x, kernel, stride, pad, groups), (x, kernel)


def _cpu_kernel_conv_bwd(stride, pad, groups, residuals, dy):
    x, kernel = residuals
    kh, kw, in_per_group, out_channels = kernel.shape
    # The input gradient reads each group's kernel transposed (in <-> out).
    per_group = kernel.reshape(kh, kw, in_per_group, groups, out_channels // groups)
    kernel_t = per_group.transpose(0, 1, 4, 3, 2).reshape(kh, kw, -1, groups * in_per_group)
    dx = _grouped_call("input_grad", x.shape, dy, kernel_t, groups, stride, pad)
    dkernel = _grouped_call("kernel_grad", kernel.shape, x, dy, groups, stride, pad)
    return dx, dkernel


_cpu_kernel_conv.defvjp(_cpu_kernel_conv_fwd, _cpu_kernel_conv_bwd)


def _merged_kernel_conv(
    x: jax.Array, kernel: jax.Array, stride: int, pad: int, groups: int, merge: int
) -> jax.Array:
    """The CPU kernels on groups merged `merge` at a time into block-diagonal ones."""
    if merge > 1:
        dense = block_diagonal_kernels(kernel, groups, merge)  # (S, kh, kw, cin, cout)
        kernel = jnp.moveaxis(dense, 0, 3).reshape(*dense.shape[1:4], -1)
    return _cpu_kernel_conv(x, kernel, stride, pad, groups // merge)


def _cpu_grouped(x: jax.Array, kernel: jax.Array, stride: int, padding, groups: int) -> jax.Array:
    """dpn_jax's kernels where they take the shape, else one dense conv per super-group."""
    (top, bottom), (left, right) = padding
    merge = cpu_kernel_merge(x, kernel, groups)
    if (
        merge is not None
        and top == bottom == left == right
        and _kernel_geometry_exists(stride, top)
        and cpu_kernels_available()
    ):
        return _merged_kernel_conv(x, kernel, stride, top, groups, merge)
    return _split_groups(x, kernel, stride, padding, groups)


# How `conv2d` lowers, chosen for what traces inside `conv_lowering(...)`:
#   "kernels": per backend, dpn_jax's CPU kernels (FFI custom calls) on CPU - the default;
#   "xla":     per backend without custom calls (1x1 convs as matmuls, grouped convs split on CPU),
#              so a `jax.export` artifact runs on any backend without dpn_jax installed;
#   "native":  one `lax.conv_general_dilated` (no `lax.platform_dependent`), for converters that
#              translate the jaxpr op by op (ONNX: a Conv with `group`).
CONV_LOWERINGS = ("kernels", "xla", "native")
_conv_lowering: contextvars.ContextVar[str] = contextvars.ContextVar(
    "dpn_jax_conv_lowering", default="kernels"
)


def current_lowering() -> str:
    """The lowering `conv_lowering` set for what traces now ("kernels" outside any block)."""
    return _conv_lowering.get()


@contextlib.contextmanager
def conv_lowering(lowering: str) -> Iterator[None]:
    """`conv2d` lowers as `lowering` in what is traced inside the block (a jitted function
    traced before keeps its trace: export a fresh function)."""
    if lowering not in CONV_LOWERINGS:
        raise ConfigError(f"unknown conv lowering {lowering!r}; choose from {CONV_LOWERINGS}")
    token = _conv_lowering.set(lowering)
    try:
        yield
    finally:
        _conv_lowering.reset(token)


def conv2d(
    x: jax.Array, kernel: jax.Array, *, stride: int = 1, groups: int = 1, padding=None
) -> jax.Array:
    """NHWC x HWIO convolution with timm's symmetric padding; lowering chosen per backend.

    `kernel` has shape (kh, kw, in_channels // groups, out_channels), like Flax's `nn.Conv`.
    On CPU, unpadded 1x1 convs become `dot_general` and grouped convs `_cpu_grouped`; every
    other backend, and dense kxk convs on CPU, use `lax.conv_general_dilated` as is
    (`conv_lowering` changes this for exports).
    """
    padding = (
        symmetric_padding(kernel.shape[0], stride)
        if padding is None
        else tuple(tuple(int(v) for v in p) for p in padding)
    )
    return _conv2d(x, kernel, stride, groups, padding, current_lowering())


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5), inline=True)
def _conv2d(
    x: jax.Array, kernel: jax.Array, stride: int, groups: int, padding, lowering: str
) -> jax.Array:
    """`conv2d` traced once per distinct shape: a DPN repeats few conv shapes many times.

    Tracing both platform branches of every convolution was most of the time it took to trace
    a train step (benchmarks/HISTORY.md, "Where a dpn68 train-step compile goes").
    `inline=True` pastes the cached jaxpr into the caller: as a nested call instead, XLA CPU ran
    the step far slower.
    """
    pointwise = groups == 1 and kernel.shape[:2] == (1, 1) and all(p == (0, 0) for p in padding)
    if lowering == "native" or not (pointwise or groups > 1):
        return _native(x, kernel, stride, padding, groups)
    if pointwise and lowering == "xla":  # autodiff's weight gradient: no custom call
        cpu = lambda x, k: lax.dot_general(
            x[:, ::stride, ::stride], k[0, 0], (((3,), (0,)), ((), ()))
        )
    elif pointwise:
        cpu = lambda x, k: _pointwise_dot(x, k, stride)
    elif lowering == "xla":
        cpu = lambda x, k: _split_groups(x, k, stride, padding, groups)
    else:
        cpu = lambda x, k: _cpu_grouped(x, k, stride, padding, groups)
    return lax.platform_dependent(
        x, kernel, cpu=cpu, default=lambda x, k: _native(x, k, stride, padding, groups)
    )
