"""Where one dpn_jax step spends its time: XLA's ops from a profiled step, grouped by kind.

    python benchmarks/profile_step.py --model dpn68 --batch-size 16 --mode train

Builds the step exactly as `benchmark.py` times it, runs two warm-up steps, profiles a third
with `jax.profiler`, and prints the thread time and count per op kind (the XLA op name without
its number: `ynn_fusion`, `ffi_call`, ...), the custom calls (dpn_jax's CPU grouped-convolution
kernels) by target and shape, then the matmuls' FLOPs and rate (read from the optimised HLO) and
the slowest matmuls with their layer and shape. On the CPU ops run
concurrently on the thread pool, so thread times add up to more than the step's wall time. Ops
whose work runs in thread-pool tasks that the profiler does not annotate (Eigen convolutions)
show only their dispatch.
"""
from __future__ import annotations

import argparse
import collections
import math
import re
import tempfile
import time
from pathlib import Path

import jax
from jax.profiler import ProfileData

from benchmark import JaxEngine


def op_thread_times(trace_dir: str) -> dict[str, float]:
    """Seconds per XLA op name, summed over every thread of the one profiled step."""
    times: dict[str, float] = collections.Counter()
    (xplane,) = Path(trace_dir).rglob("*.xplane.pb")
    for plane in ProfileData.from_file(str(xplane)).planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if not event.name.startswith("ThunkExecutor"):
                    times[event.name] += event.duration_ns / 1e9
    return times


def matmul_flops(hlo: str) -> dict[str, tuple[float, str]]:
    """Op name -> (FLOPs of its dot, "layer [output shape] K=...") for every fusion with a dot."""
    computations = {m[1]: (m[2], m[3]) for m in re.finditer(
        r"^%([\w.\-]+) \(([^)]*)\) -> [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S)}
    found = {}
    for m in re.finditer(r"^\s*%([\w.\-]+) = [^\n]*?calls=%([\w.\-]+)([^\n]*)", hlo, re.M):
        params, body = computations.get(m[2], ("", ""))
        dot = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\), "
                        r"lhs_contracting_dims=\{([\d,]*)\}", body)
        if not dot:
            continue
        lhs = re.search(re.escape(dot[2]) + r"(?:: | = )\w+\[([\d,]*)\]", params + "\n" + body)
        lhs_dims = [int(d) for d in lhs[1].split(",")]
        k = math.prod(lhs_dims[int(i)] for i in dot[3].split(","))
        flops = 2 * k * math.prod(int(d) for d in dot[1].split(","))
        layer = re.search(r'op_name="[^"]*?/features/(\w+/\w+)', m[3])
        found[m[1]] = (flops, (layer[1] if layer else "?") + f" [{dot[1]}] K={k}")
    return found


def custom_calls(hlo: str) -> dict[str, str]:
    """Custom-call instruction name -> "target result-shape" (dpn_jax's CPU grouped convs)."""
    return {m[1]: f"{m[3]} {m[2]}" for m in re.finditer(
        r'^\s*%([\w.\-]+) = (\w+\[[\d,]*\])[^\n]*custom_call_target="([\w.\-]+)"', hlo, re.M)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dpn68")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--mode", choices=("infer", "train"), default="train")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--top", type=int, default=15, help="how many of the slowest ops to list")
    args = p.parse_args()

    engine = JaxEngine("dpn_jax", args.mode, args.model, args.batch_size, args.resolution,
                       args.dtype)
    engine.build()
    for _ in range(2):
        engine.step()
    trace_dir = tempfile.mkdtemp(prefix="dpn_jax_profile_")
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
    times = op_thread_times(trace_dir)
    hlo = engine.compiled.as_text()
    matmuls = matmul_flops(hlo)

    print(f"{args.model} {args.mode} batch {args.batch_size} {args.resolution}px {args.dtype} on "
          f"{jax.default_backend()}: step {wall:.2f} s wall, {sum(times.values()):.2f} s of "
          f"profiled op time; compile {engine.result.compile_s:.1f} s")
    kinds, counts = collections.Counter(), collections.Counter()
    for name, seconds in times.items():
        kind = re.sub(r"[.\d]+$", "", name)
        kinds[kind] += seconds
        counts[kind] += 1
    print(f"\n{'op kind':32s} {'thread s':>9s} {'ops':>6s}")
    for kind, seconds in kinds.most_common(args.top):
        print(f"{kind:32s} {seconds:9.3f} {counts[kind]:6d}")
    per_call = collections.Counter()
    for name, what in custom_calls(hlo).items():
        per_call[what] += times.get(name, 0.0)
    if per_call:
        print(f"\n{'custom call (all layers of a shape)':58s} {'thread s':>9s}")
        for what, seconds in per_call.most_common(args.top):
            print(f"{what:58s} {seconds:9.3f}")
    timed = [(times[n], f, what) for n, (f, what) in matmuls.items() if times.get(n)]
    if timed:
        total_s, total_f = sum(t for t, _, _ in timed), sum(f for _, f, _ in timed)
        print(f"\nmatmuls: {total_f / 1e9:.1f} GFLOP in {total_s:.2f} thread s = "
              f"{total_f / total_s / 1e9:.1f} GFLOP/s per thread; slowest:")
        for seconds, flops, what in sorted(timed, reverse=True)[:args.top]:
            print(f"  {seconds * 1e3:7.1f} ms {flops / seconds / 1e9:6.1f} GFLOP/s  {what}")


if __name__ == "__main__":
    main()
