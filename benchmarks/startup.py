"""Start-up time with JAX's persistent compilation cache: a cold run, then the same run again.

    python benchmarks/startup.py --model dpn68 --mode infer

Each run is a fresh process that imports dpn_jax, creates the model, compiles the step and runs
it once, as a CLI does; both runs share a new, empty cache directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def one_run(model: str, mode: str, batch: int, resolution: int, cache_dir: str) -> dict:
    """What a CLI does before its first result, each phase timed (runs in the child process)."""
    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp

    import dpn_jax
    from dpn_jax.system.compilation_cache import enable_compilation_cache

    enable_compilation_cache(cache_dir)
    t_import = time.perf_counter()
    net, variables = dpn_jax.create_model(model)
    jax.block_until_ready(variables)
    t_create = time.perf_counter()
    x = jnp.zeros((batch, resolution, resolution, 3), jnp.float32)
    if mode == "infer":
        fn = jax.jit(lambda v, x: net.apply(v, x, train=False))
    else:

        def loss(params, x):
            logits, _ = net.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return logits.mean()

        fn = jax.jit(lambda v, x: jax.grad(loss)(v["params"], x))
    compiled = fn.lower(variables, x).compile()
    t_compile = time.perf_counter()
    jax.block_until_ready(compiled(variables, x))
    t_end = time.perf_counter()
    return dict(
        import_s=t_import - t0,
        create_s=t_create - t_import,
        compile_s=t_compile - t_create,
        first_step_s=t_end - t_compile,
        total_s=t_end - t0,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dpn68")
    p.add_argument("--mode", choices=("infer", "train"), default="infer")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--child", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_run(args.model, args.mode, args.batch, args.resolution, args.child)))
        return
    cache_dir = tempfile.mkdtemp(prefix="dpn_jax_startup_cache_")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--model",
        args.model,
        "--mode",
        args.mode,
        "--batch",
        str(args.batch),
        "--resolution",
        str(args.resolution),
        "--child",
        cache_dir,
    ]
    print(f"{args.model} {args.mode} batch {args.batch} at {args.resolution}, cache {cache_dir}")
    for name in ("first run (cold cache)", "second run (warm cache)"):
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        times = json.loads(out.strip().splitlines()[-1])
        print(f"{name:24} " + "  ".join(f"{k} {v:6.1f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
