"""Times a dpn_jax CPU step with different builds of its CPU kernels, in one process.

Each build is a kernel library (the one `DPN_JAX_CPU_KERNELS` picks, `installed`, or any other
build of `csrc/`: an older commit's, the baseline build) whose handlers are registered under
their own target names; the step is traced and compiled once per build, and the timed rounds
alternate between them (median of `--iters` rounds). Before/after comparisons of a kernel change
and the baseline build's cost use it (rounds alternate, so a shared machine's load
moves all builds alike; each round's ratio to the installed build is the robust figure):

    python benchmarks/kernel_builds.py --model dpn68 --batch-size 16 \\
        --build old=/tmp/old/dpn_jax/ops/_cpu_kernels.cpython-311-x86_64-linux-gnu.so \\
        --build baseline=dpn_jax/ops/_cpu_kernels.cpython-311-x86_64-linux-gnu.so

where an older commit's build comes from its sources, e.g. (a437895: one library, AVX2 + FMA
where the building CPU has them):

    mkdir /tmp/old && git archive a437895 setup.py pyproject.toml README.md dpn_jax \\
        | tar -x -C /tmp/old && (cd /tmp/old && python setup.py build_ext --inplace)
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time

import dpn_jax  # noqa: F401  (first, before JAX starts: dpn_jax/system/host_memory.py)

# isort: split
import jax
from benchmark import JaxEngine

from dpn_jax.ops import conv, cpu_kernels


def add_build_option(parser: argparse.ArgumentParser) -> None:
    """`--build NAME=LIBRARY` (repeatable): `args.build` is a list of (name, library) pairs."""

    def name_and_library(text: str) -> tuple[str, str]:
        name, equals, library = text.partition("=")
        if not (name and equals and library):
            raise argparse.ArgumentTypeError(f"expected NAME=LIBRARY, got {text!r}")
        return name, library

    parser.add_argument(
        "--build",
        type=name_and_library,
        action="append",
        default=[],
        metavar="NAME=LIBRARY",
        help="another kernel library to time beside the installed one (repeatable)",
    )


@contextlib.contextmanager
def kernel_build(name: str, library: str | None):
    """Within the block, `conv2d` traces calls to `library`'s kernels (None: the loaded build)."""
    if library is None:
        yield
        return
    suffix = f"_{name}"
    cpu_kernels.register_targets(library, suffix)
    original = conv.kernel_call
    conv.kernel_call = lambda target, *args, **attributes: original(
        target + suffix, *args, **attributes
    )
    jax.clear_caches()  # conv2d's traces hold the other build's target names
    try:
        yield
    finally:
        conv.kernel_call = original
        jax.clear_caches()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dpn68")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--mode", choices=("infer", "train"), default="train")
    p.add_argument("--iters", type=int, default=9)
    add_build_option(p)
    args = p.parse_args()
    if not cpu_kernels.cpu_kernels_available():
        raise SystemExit("no CPU kernels loaded: nothing to compare")
    builds = {"installed": None, **dict(args.build)}

    engines = {}
    for name, library in builds.items():
        with kernel_build(name, library):
            engine = JaxEngine(
                "dpn_jax", args.mode, args.model, args.batch_size, args.resolution, "float32"
            )
            engine.build()
            hlo = engine.compiled.as_text()
        suffix = "" if library is None else f"_{name}"
        called = sorted(t for t in cpu_kernels.TARGETS if f'"{t}{suffix}"' in hlo)
        print(
            f"{name}: {library or cpu_kernels.chosen_library()}; compile "
            f"{engine.result.compile_s:.1f} s; calls {called}",
            flush=True,
        )
        engine.step()  # first-run allocations
        engines[name] = engine
    times = {name: [] for name in engines}
    order = random.Random(0)  # a new order each round: no build always runs after another
    for round_ in range(args.iters):
        for name in order.sample(list(engines), len(engines)):
            t0 = time.perf_counter()
            engines[name].step()
            times[name].append(time.perf_counter() - t0)
        print(
            f"round {round_ + 1}: "
            + "  ".join(f"{name} {t[-1]:.3f} s" for name, t in times.items()),
            flush=True,
        )
    print(
        f"{args.model} {args.mode} batch {args.batch_size}, median of {args.iters} "
        "interleaved rounds (ratio: the median of each round's time over installed's):"
    )
    for name, seconds in times.items():
        ratio = statistics.median(s / i for s, i in zip(seconds, times["installed"]))
        print(
            f"  {name:12s} {statistics.median(seconds):.3f} s  (min {min(seconds):.3f}, "
            f"max {max(seconds):.3f})  ratio {ratio:.3f}"
        )


if __name__ == "__main__":
    main()
