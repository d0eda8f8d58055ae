"""Times the weight gradient of DPN's 1x1 convolutions on CPU, layer shape by layer shape.

dW = x^T dy over the N*H*W rows: dpn_jax's FFI kernel (`csrc/pointwise_grad_cpu.cc`), the
same contraction as XLA's `dot_general` (which writes x transposed first), and torch's
`x.t() @ dy` (its BLAS), float32, same process, rounds interleaved; GFLOP/s of the median.
`--build NAME=LIBRARY` adds a column for another build of the kernel (see kernel_builds.py).

    python benchmarks/pointwise_grad.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import dpn_jax  # noqa: F401  (first, before JAX starts: dpn_jax/system/host_memory.py)

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
import torch
from grouped_conv import interleaved_medians
from jax import lax
from kernel_builds import add_build_option

from dpn_jax.ops import cpu_kernels

# (rows = batch 16 x H x W, input channels, output channels): dpn68's 1x1 layers, one per stage
# and kind (c1x1_a in, c1x1_c out), then its classifier.
SHAPES = [
    (50176, 144, 256),
    (50176, 128, 128),
    (50176, 128, 80),
    (12544, 288, 256),
    (12544, 256, 160),
    (3136, 512, 512),
    (3136, 704, 1024),
    (784, 1024, 1000),
]


def _kernel(suffix: str = "") -> Callable:
    target = "dpn_pointwise_kernel_grad" + suffix
    fn = jax.jit(lambda x, dy: cpu_kernels.kernel_call(target, (x.shape[1], dy.shape[1]), x, dy))
    return lambda x, dy: fn(x, dy).block_until_ready()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=7)
    add_build_option(p)
    args = p.parse_args()
    kernels = {"kernel": _kernel()}
    for name, library in args.build:
        cpu_kernels.register_targets(library, f"_{name}")
        kernels[name] = _kernel(f"_{name}")
    xla = jax.jit(lambda x, dy: lax.dot_general(x, dy, (((0,), (0,)), ((), ()))))
    print(
        f"median of {args.iters}, GFLOP/s; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads"
    )
    columns = (*kernels, "xla", "torch")
    print(f"{'rows':>6s} {'in':>5s} {'out':>5s}   " + " ".join(f"{c:>10s}" for c in columns))
    rng = np.random.default_rng(0)
    for rows, in_c, out_c in SHAPES:
        x = rng.standard_normal((rows, in_c), dtype=np.float32)
        dy = rng.standard_normal((rows, out_c), dtype=np.float32)
        xj, dyj, xt, dyt = (
            jnp.asarray(x),
            jnp.asarray(dy),
            torch.from_numpy(x),
            torch.from_numpy(dy),
        )
        want = xla(xj, dyj)
        for kernel in kernels.values():
            np.testing.assert_allclose(
                kernel(xj, dyj), want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want)))
            )
        ms = interleaved_medians(
            {
                **{name: ([kernel], (xj, dyj)) for name, kernel in kernels.items()},
                "xla": ([lambda a, b: xla(a, b).block_until_ready()], (xj, dyj)),
                "torch": ([lambda a, b: a.t() @ b], (xt, dyt)),
            },
            args.iters,
        )
        rate = {name: 2 * rows * in_c * out_c / times[0] / 1e6 for name, times in ms.items()}
        print(
            f"{rows:6d} {in_c:5d} {out_c:5d}   " + " ".join(f"{rate[c]:10.0f}" for c in columns),
            flush=True,
        )


if __name__ == "__main__":
    main()
