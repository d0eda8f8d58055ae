"""The machine's sustained float32 matmul rate: the roof for benchmark.py's GFLOP/s column.

    python benchmarks/peak_flops.py
    python benchmarks/peak_flops.py --sizes 2048 4096 --threads 1 2 --rounds 5 --json peak.json

Large square matmuls in XLA CPU (`jnp.dot`) and in PyTorch (`torch.mm`, oneDNN/MKL), on 1 core
and on all cores: each (engine, cores) runs in its own worker pinned to those cores, as
benchmark.py's workers are (`--threads`). A round repeats the matmul for at least
`--round-seconds`; the table gives the median round's GFLOP/s (2 n^3 FLOPs per matmul) and
that per core. A convolution network's step, whose convolutions are smaller matmuls plus
memory-bound work, cannot do its arithmetic faster than the best of these on the same cores,
so a speed target whose GFLOP/s (benchmark.py: reference FLOPs per image x img/s) lies above
them cannot be met on this machine.

The FMA estimate is the clock /proc/cpuinfo reports (a VM's is the nominal one: cores may boost
past it) x `--flops-per-cycle` x cores, an estimate to compare with, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from benchmark import setup_threads  # the same core pinning as benchmark.py's workers

ENGINES = ("jax_dot", "torch_mm")


def _matmul(engine: str, n: int) -> Callable[[], None]:
    """One n x n float32 matmul of random operands, run to completion."""
    if engine == "jax_dot":
        import jax
        import jax.numpy as jnp

        a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32)
        dot = jax.jit(jnp.dot).lower(a, b).compile()
        return lambda: dot(a, b).block_until_ready()
    import torch

    a, b = torch.randn(2, n, n, generator=torch.Generator().manual_seed(0))
    out = torch.empty(n, n)
    return lambda: torch.mm(a, b, out=out)


def measure(engine: str, n: int, rounds: int, round_seconds: float) -> list[float]:
    """GFLOP/s of each round, after two warm-up matmuls that also size the rounds."""
    matmul = _matmul(engine, n)
    matmul()
    t0 = time.perf_counter()
    matmul()
    reps = max(1, round(round_seconds / (time.perf_counter() - t0)))
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            matmul()
        rates.append(2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return rates


def worker(args: argparse.Namespace) -> list[dict]:
    """One engine on `--threads` cores: every size."""
    engine, threads = args.worker, args.threads[0]
    setup_threads(threads, uses_torch=engine == "torch_mm")
    cores = len(os.sched_getaffinity(0))
    rows = []
    for n in args.sizes:
        rates = measure(engine, n, args.rounds, args.round_seconds)
        gflops = statistics.median(rates)
        rows.append(
            dict(
                engine=engine,
                cores=cores,
                size=n,
                gflop_per_s=gflops,
                gflop_per_s_per_core=gflops / cores,
                round_gflop_per_s=rates,
            )
        )
    return rows


def cpu_info() -> dict:
    """The processor's name and the clock the kernel reports, where /proc/cpuinfo has them."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    mhz = info.get("cpu MHz")
    return dict(model_name=info.get("model name", platform.processor()), mhz=mhz and float(mhz))


def print_table(rows: list[dict], machine: dict, flops_per_cycle: int) -> None:
    mhz = machine["mhz"]
    print(
        f"{machine['model_name']}, {machine['cpus']} cores, "
        f"{f'{mhz:.0f} MHz reported' if mhz else 'clock unknown'}"
    )
    header = f"{'engine':9} {'cores':>5} {'size':>5} {'GFLOP/s':>8} {'per core':>8} {'FMA est.':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        bound = mhz and mhz / 1e3 * flops_per_cycle * r["cores"]
        print(
            f"{r['engine']:9} {r['cores']:5d} {r['size']:5d} {r['gflop_per_s']:8.1f} "
            f"{r['gflop_per_s_per_core']:8.1f} {f'{bound:9.1f}' if bound else '-':>9}"
        )
    print(
        f"FMA est.: reported clock x {flops_per_cycle} float32 FLOPs per cycle x cores "
        "(--flops-per-cycle); a core that boosts past the reported clock exceeds it"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[2048, 4096], help="matrix sizes n")
    p.add_argument(
        "--threads",
        nargs="+",
        type=int,
        default=[1, len(os.sched_getaffinity(0))],
        help="core counts to measure on (default: 1 and all)",
    )
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--round-seconds", type=float, default=1.0, help="least length of a round")
    p.add_argument(
        "--flops-per-cycle",
        type=int,
        default=32,
        help="float32 FLOPs per core per cycle for the FMA bound (32: two 256-bit FMA pipes, "
        "as AVX2 cores and AMD Zen 4's AVX-512 have; 64: two 512-bit FMA pipes)",
    )
    p.add_argument("--json", help="also write every number here")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    common = ["--sizes", *map(str, args.sizes), "--rounds", str(args.rounds)]
    common += ["--round-seconds", str(args.round_seconds)]
    rows = []
    for threads in args.threads:
        for engine in args.engines:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine]
            out = subprocess.run(
                cmd + ["--threads", str(threads)] + common, stdout=subprocess.PIPE, check=True
            ).stdout
            rows += json.loads(out)
    machine = dict(cpu_info(), cpus=len(os.sched_getaffinity(0)), load_average=os.getloadavg())
    print_table(rows, machine, args.flops_per_cycle)
    if args.json:
        record = dict(
            command=" ".join([os.path.basename(sys.executable), *sys.argv]),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            machine=dict(machine, platform=platform.platform()),
            flops_per_cycle=args.flops_per_cycle,
            results=rows,
        )
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
