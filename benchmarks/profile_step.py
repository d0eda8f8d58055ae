"""Where one dpn_jax CPU step spends its time: XLA's ops from a profiled step, by kind.

    python benchmarks/profile_step.py --model dpn68 --batch-size 16 --mode train
    python benchmarks/profile_step.py --engine dpn_jax_plain   # the plain step, to compare

Builds the step exactly as `benchmark.py` times it (`--engine`: the trainer's step, the plain
Linen or NNX step), prints the optimised HLO's instruction counts (the entry computation's by
opcode, plus the copies, collectives and conditionals anywhere), runs two warm-up steps,
profiles a third with `jax.profiler`, and prints the thread-seconds per op kind (matmuls, each
custom call target, else the XLA op name without its number: `add_bitcast_fusion`, ...), the
custom calls (dpn_jax's CPU kernels) by target and shape, then the matmuls' FLOPs and rate (read
from the optimised HLO) and the slowest matmuls with their layer and shape. Thread-seconds add up to
about the step's wall time times XLA's thread count; see `op_thread_times` for how work on the
thread pool is attributed.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import math
import re
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dpn_jax  # noqa: F401  (first, before JAX starts: dpn_jax/system/host_memory.py)

# isort: split
import jax
from benchmark import engine_class
from jax.profiler import ProfileData


def _is_op(name: str) -> bool:
    return not name.startswith(("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool"))


def op_thread_times(trace_dir: str, sample_ns: int = 20_000) -> dict[str, float]:
    """Thread-seconds per XLA op name in the one profiled step ("idle": no op), sampled.

    An XLA CPU thread works for an op while the op's event runs on it, and while it runs
    thread-pool tasks (between ThreadpoolListener's StartRegion and StopRegion markers), which
    belong to an op running on another thread: the executor runs independent ops concurrently,
    and each op also splits its work over the pool. Summing event durations instead counts an
    op that shares the cores with another as if it had both.
    """
    (xplane,) = Path(trace_dir).rglob("*.xplane.pb")
    threads = [
        line
        for plane in ProfileData.from_file(str(xplane)).planes
        for line in plane.lines
        if line.name.startswith("tf_XLAEigen")
    ]
    ops, regions = {}, {}
    for line in threads:
        events = sorted((e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events)
        ops[line.name] = [e for e in events if e[1] > e[0] and _is_op(e[2])]
        regions[line.name], start = [], None
        for t, _, name in events:
            if name == "ThreadpoolListener::StartRegion":
                start = t
            elif name == "ThreadpoolListener::StopRegion" and start is not None:
                regions[line.name].append((start, t))
                start = None

    def op_at(thread: str, t: float) -> str | None:
        """The op running on `thread` at time t: a thread's ops run one after another."""
        i = bisect.bisect_right(ops[thread], (t, math.inf, ""))
        return ops[thread][i - 1][2] if i and ops[thread][i - 1][1] > t else None

    if not ops:
        raise SystemExit("no XLA CPU threads in the trace: profile_step.py reads CPU steps")
    begin = min(e[0] for events in ops.values() for e in events[:1])
    end = max(e[1] for events in ops.values() for e in events)
    times: dict[str, float] = collections.Counter()
    for thread in ops:
        others = [o for o in ops if o != thread]
        pending = iter(regions[thread] + [(math.inf, math.inf)])
        region = next(pending)
        for t in range(int(begin), int(end), sample_ns):
            while region[1] < t:
                region = next(pending)
            owner = op_at(thread, t)
            if owner is None and region[0] <= t:
                owner = next(filter(None, (op_at(o, t) for o in others)), None)
            times[owner or "idle"] += sample_ns / 1e9
    return times


def matmul_flops(hlo: str) -> dict[str, tuple[float, str]]:
    """Op name -> (FLOPs of its dot, "layer [output shape] K=...") for every fusion with a dot."""
    computations = {
        m[1]: (m[2], m[3])
        for m in re.finditer(r"^%([\w.\-]+) \(([^)]*)\) -> [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S)
    }
    found = {}
    for m in re.finditer(r"^\s*%([\w.\-]+) = [^\n]*?calls=%([\w.\-]+)([^\n]*)", hlo, re.M):
        params, body = computations.get(m[2], ("", ""))
        dot = re.search(
            r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\), "
            r"lhs_contracting_dims=\{([\d,]*)\}",
            body,
        )
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
    return {
        m[1]: f"{m[3]} {m[2]}"
        for m in re.finditer(
            r'^\s*%([\w.\-]+) = (\w+\[[\d,]*\])[^\n]*custom_call_target="([\w.\-]+)"', hlo, re.M
        )
    }


def hlo_op_counts(hlo: str) -> tuple[collections.Counter, collections.Counter]:
    """Instructions of the optimised HLO by opcode: in the entry computation (fusions count
    once, whatever they hold), and the copies, collectives and conditionals in any computation
    (a conditional's branches are their own computations)."""
    ops = lambda text: collections.Counter(
        re.findall(r"^\s*(?:ROOT )?%[\w.\-]+ = [^\n]*? ([a-z][\w\-]*)\(", text, re.M)
    )
    entry = hlo[hlo.index("\nENTRY") :]
    anywhere = ops(hlo)
    wanted = ("copy", "all-reduce", "all-gather", "conditional", "while")
    return ops(entry[: entry.index("\n}\n")]), collections.Counter(
        {k: anywhere[k] for k in wanted if anywhere[k]}
    )


def host_cost_per_step(step: Callable[[], None], steps: int = 3) -> dict[str, float]:
    """Page faults and the process's kernel and user CPU seconds per step (`getrusage`): what a
    step costs the host beside its ops (e.g. faulting in freshly mapped temporaries)."""
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return {
        "page faults": (after.ru_minflt - before.ru_minflt) / steps,
        "kernel s": (after.ru_stime - before.ru_stime) / steps,
        "user s": (after.ru_utime - before.ru_utime) / steps,
        "wall s": wall / steps,
        "MiB peak RSS": after.ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--engine", choices=("dpn_jax", "dpn_jax_plain", "dpn_jax_nnx"), default="dpn_jax"
    )
    p.add_argument("--model", default="dpn68")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--mode", choices=("infer", "train"), default="train")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--top", type=int, default=15, help="how many of the slowest ops to list")
    args = p.parse_args()

    engine = engine_class(args.engine)(
        args.engine, args.mode, args.model, args.batch_size, args.resolution, args.dtype
    )
    engine.build()
    for _ in range(2):  # (the second step still finds new heap memory to fault in)
        engine.step()
    host = host_cost_per_step(engine.step)
    trace_dir = tempfile.mkdtemp(prefix="dpn_jax_profile_")
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
    times = op_thread_times(trace_dir)
    hlo = engine.compiled.as_text()
    entry, anywhere = hlo_op_counts(hlo)
    matmuls = matmul_flops(hlo)

    calls = custom_calls(hlo)
    kind_of = lambda name: (
        "matmul"
        if name in matmuls
        else calls[name].split()[0]
        if name in calls
        else re.sub(r"[.\d]+$", "", name)
    )
    kinds, counts = collections.Counter(), collections.Counter()
    for name, seconds in times.items():
        kinds[kind_of(name)] += seconds
        counts[kind_of(name)] += 1
    print(
        f"{args.engine} {args.model} {args.mode} batch {args.batch_size} {args.resolution}px "
        f"{args.dtype} on "
        f"{jax.default_backend()}: step {wall:.2f} s wall, {sum(times.values()):.2f} "
        f"thread-s ({kinds['idle']:.2f} idle); compile {engine.result.compile_s:.1f} s"
    )
    print("host, per step (3 steps):", ", ".join(f"{v:.3g} {k}" for k, v in host.items()))
    print("HLO entry instructions:", ", ".join(f"{k} {n}" for k, n in entry.most_common()))
    print("HLO anywhere:", ", ".join(f"{k} {n}" for k, n in anywhere.most_common()) or "-")
    print(f"\n{'op kind':32s} {'thread s':>9s} {'ops':>6s}")
    for kind, seconds in kinds.most_common(args.top):
        print(f"{kind:32s} {seconds:9.3f} {counts[kind]:6d}")
    per_call = collections.Counter()
    for name, what in calls.items():
        per_call[what] += times.get(name, 0.0)
    if per_call:
        print(f"\n{'custom call (all layers of a shape)':58s} {'thread s':>9s}")
        for what, seconds in per_call.most_common(args.top):
            print(f"{what:58s} {seconds:9.3f}")
    timed = [(times[n], f, what) for n, (f, what) in matmuls.items() if times.get(n)]
    if timed:
        total_s, total_f = sum(t for t, _, _ in timed), sum(f for _, f, _ in timed)
        print(
            f"\nmatmuls: {total_f / 1e9:.1f} GFLOP in {total_s:.2f} thread s = "
            f"{total_f / total_s / 1e9:.1f} GFLOP/s per thread; slowest:"
        )
        for seconds, flops, what in sorted(timed, reverse=True)[: args.top]:
            print(f"  {seconds * 1e3:7.1f} ms {flops / seconds / 1e9:6.1f} GFLOP/s  {what}")


if __name__ == "__main__":
    main()
