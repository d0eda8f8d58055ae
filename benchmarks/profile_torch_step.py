"""Where one timm CPU step spends its time: torch.profiler's ops by kind, beside profile_step.py.

    python benchmarks/profile_torch_step.py --engine timm_compile --model dpn68 --mode train

Builds the step exactly as `benchmark.py` times it (timm eager NCHW, channels_last, or
torch.compile), without dpn_jax in the process, runs three warm-up steps, profiles a fourth and
prints the wall seconds per kind of op: oneDNN's convolutions (forward, backward), inductor's
generated loops (`cpp_fused_...`; `--loops` lists them by the ops they fuse),
and the other ATen ops (the optimizer's, eager BatchNorm, ...). Times are each op's own time on
the calling thread; torch's ops split their work over the OpenMP pool inside that time, so the
kinds add up to the step's wall time, which is what to set beside profile_step.py's
thread-seconds divided by its thread count.
"""

from __future__ import annotations

import argparse
import collections
import re
import time

from benchmark import engine_class, setup_threads

CONVOLUTION_OPS = {
    "aten::mkldnn_convolution": "convolution forward (oneDNN)",
    "aten::convolution_backward": "convolution backward (oneDNN)",
}


def kind_of(op: str) -> str:
    """Convolutions, inductor's loops (`graph_0_cpp_fused_relu_3` -> "inductor: relu"), or the
    ATen op itself."""
    if op in CONVOLUTION_OPS:
        return CONVOLUTION_OPS[op]
    fused = re.fullmatch(r"graph_\d+_cpp_fused_(.*?)(?:_\d+)?", op)
    return f"inductor: {fused[1]}" if fused else op


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("timm", "timm_cl", "timm_compile"), default="timm_compile")
    p.add_argument("--model", default="dpn68")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--mode", choices=("infer", "train"), default="train")
    p.add_argument("--threads", type=int, default=0, help="cores to use (0: all)")
    p.add_argument("--top", type=int, default=15, help="how many kinds to list")
    p.add_argument("--loops", action="store_true", help="inductor's loops by the ops they fuse")
    args = p.parse_args()

    setup_threads(args.threads, uses_torch=True)
    import torch
    import torch._inductor.config
    from torch.profiler import ProfilerActivity, profile

    torch._inductor.config.cpp.enable_kernel_profile = True  # name inductor's loops
    engine = engine_class(args.engine)(
        args.engine, args.mode, args.model, args.batch_size, args.resolution
    )
    engine.build()
    for _ in range(3):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0

    kinds, counts = collections.Counter(), collections.Counter()
    for op in profiled.key_averages():
        kind = kind_of(op.key)
        if not args.loops and kind.startswith("inductor: "):
            kind = "inductor's loops"
        kinds[kind] += op.self_cpu_time_total / 1e6
        counts[kind] += op.count
    print(
        f"{args.engine} {args.model} {args.mode} batch {args.batch_size} {args.resolution}px "
        f"float32 on {torch.get_num_threads()} threads: step {wall:.2f} s wall "
        f"(profiled: {sum(kinds.values()):.2f} s)"
    )
    print(f"\n{'op kind':64s} {'wall s':>8s} {'calls':>6s}")
    for kind, seconds in kinds.most_common(args.top):
        print(f"{kind[:64]:64s} {seconds:8.3f} {counts[kind]:6d}")


if __name__ == "__main__":
    main()
