"""Times the CPU lowerings of DPN's grouped 3x3 convolution, layer by layer, against PyTorch.

For each (size, channels, channels per group, stride) of dpn68's and dpn92's `c3x3_b` layers:
dpn_jax's FFI kernels (where they take the shape), the split lowering (one dense convolution per
super-group), and torch's grouped convolution (oneDNN, channels_last), forward and forward +
gradient (input and kernel) of the sum of squares. Median ms of `--iters`, rounds interleaved.
`--build NAME=LIBRARY` adds a column for another build of the kernels (see kernel_builds.py),
`--kernels-only` leaves out the split lowering and torch.

    python benchmarks/grouped_conv.py --batch-size 16
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence

import dpn_jax  # noqa: F401  (first, before JAX starts: dpn_jax/system/host_memory.py)

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
import torch
from kernel_builds import add_build_option, kernel_build

from dpn_jax.ops import conv

# (size, channels, channels per group, stride): dpn68's four stages and their stride-2 entries,
# then dpn92's (3, 6, 12, 24 channels per group).
SHAPES = [
    (56, 128, 4, 1),
    (56, 256, 8, 2),
    (28, 256, 8, 1),
    (28, 512, 16, 2),
    (14, 512, 16, 1),
    (14, 1024, 32, 2),
    (7, 1024, 32, 1),
    (56, 96, 3, 1),
    (28, 192, 6, 1),
    (14, 384, 12, 1),
    (7, 768, 24, 1),
]


def _jax_fns(conv: Callable, x: jax.Array, k: jax.Array) -> tuple[Callable, Callable]:
    """Compiled now (a kernel build's targets are chosen at trace time)."""
    forward = jax.jit(conv).lower(x, k).compile()
    grad = (
        jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1)))
        .lower(x, k)
        .compile()
    )
    return (
        lambda x, k: jax.block_until_ready(forward(x, k)),
        lambda x, k: jax.block_until_ready(grad(x, k)),
    )


def _torch_fns(stride: int, groups: int) -> tuple[Callable, Callable]:
    conv = lambda x, k: torch.nn.functional.conv2d(x, k, stride=stride, padding=1, groups=groups)

    def forward(x, k):
        with torch.no_grad():
            conv(x, k)

    def grad(x, k):
        x.grad = k.grad = None
        (conv(x, k) ** 2).sum().backward()

    return forward, grad


def interleaved_medians(
    engines: dict[str, tuple[Sequence[Callable], tuple]], iters: int
) -> dict[str, list[float]]:
    """name -> median ms of each of its functions on its inputs, every engine once per round.

    Each round runs the engines in a new (seeded) random order: an engine that always ran right
    after torch paid for torch's threads still spinning (BENCHMARKS.md, "Why a random order in
    the in-process scripts").
    """
    times = {name: [[] for _ in fns] for name, (fns, _) in engines.items()}
    for fns, inputs in engines.values():  # warm-up: compile, first-call allocations
        for fn in fns:
            fn(*inputs)
    order = random.Random(0)
    for _ in range(iters):
        for name in order.sample(list(engines), len(engines)):
            fns, inputs = engines[name]
            for part, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn(*inputs)
                times[name][part].append(1e3 * (time.perf_counter() - t0))
    return {name: [statistics.median(t) for t in parts] for name, parts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=7)
    add_build_option(p)
    p.add_argument("--kernels-only", action="store_true", help="no split lowering, no torch")
    args = p.parse_args()
    builds = {"kernels": None, **dict(args.build)}
    others = () if args.kernels_only else ("split", "torch")
    print(
        f"batch {args.batch_size}, median of {args.iters}, ms forward / forward+gradient; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    print(
        f"{'size':>4s} {'C':>5s} {'ch/g':>4s} {'s':>2s}   "
        + " ".join(f"{name:>16s}" for name in (*builds, *others))
    )
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        _time_shape(rng, args.batch_size, args.iters, builds, others, *shape)


def _time_shape(
    rng: np.random.Generator,
    batch_size: int,
    iters: int,
    builds: dict[str, str | None],
    others: Sequence[str],
    size: int,
    channels: int,
    per_group: int,
    stride: int,
) -> None:
    """Prints one table row: every lowering of this layer, forward and forward + gradient."""
    groups = channels // per_group
    x = rng.standard_normal((batch_size, size, size, channels), dtype=np.float32)
    k = rng.standard_normal((3, 3, per_group, channels), dtype=np.float32) * 0.1
    xj, kj = jnp.asarray(x), jnp.asarray(k)
    engines = {}
    merge = conv.cpu_kernel_merge(xj, kj, groups)
    if merge is not None and conv.cpu_kernels_available():
        kernels = lambda x, k: conv._merged_kernel_conv(x, k, stride, 1, groups, merge)
        for name, library in builds.items():
            with kernel_build(name, library):
                engines[name] = (_jax_fns(kernels, xj, kj), (xj, kj))
    if "split" in others:
        padding = conv.symmetric_padding(3, stride)
        split = lambda x, k: conv._split_groups(x, k, stride, padding, groups)
        engines["split"] = (_jax_fns(split, xj, kj), (xj, kj))
    if "torch" in others:
        xt = (
            torch.from_numpy(x)
            .permute(0, 3, 1, 2)
            .contiguous(memory_format=torch.channels_last)
            .requires_grad_()
        )
        kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous().requires_grad_()
        engines["torch"] = (_torch_fns(stride, groups), (xt, kt))
    ms = interleaved_medians(engines, iters)
    cells = [
        f"{ms[name][0]:.1f} / {ms[name][1]:.1f}" if name in ms else "-"
        for name in (*builds, *others)
    ]
    print(
        f"{size:4d} {channels:5d} {per_group:4d} {stride:2d}   "
        + " ".join(f"{cell:>16s}" for cell in cells),
        flush=True,
    )


if __name__ == "__main__":
    main()
