"""Train a DPN: `python train.py` runs the digits demo; see configs/ for ImageNet and fine-tuning.

    python train.py --config configs/imagenet.py:dpn92 --workdir runs/dpn92 \
        --config.batch_size=1024
Multi-host: run the same command on every host; under Slurm or Open MPI (or with JAX's
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) `jax.distributed` finds the
others by itself, else pass --coordinator_address / --num_processes / --process_id.
"""

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Training config file (default: the digits demo).",
    lock_config=True,
)
flags.DEFINE_string("workdir", "runs/digits", "Checkpoints, logs and the exported model go here.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")

# Launchers that start one process per host or device and tell JAX where the others are.
MULTI_PROCESS_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")


def initialize_distributed() -> None:
    """Join a multi-process run when the flags or the launcher describe one (CPU: over gloo)."""
    import jax

    explicit = FLAGS.coordinator_address is not None or FLAGS.num_processes is not None
    launched = any(int(os.environ.get(name, "1") or 1) > 1 for name in MULTI_PROCESS_ENV)
    if not explicit and not launched:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def request_deterministic_gpu_ops() -> None:
    """XLA's GPU backend sums some reductions (e.g. scatter-adds, cuDNN's convolution
    gradients) in a scheduling-dependent order unless told otherwise; it reads the flag when the
    backend starts, so this must run before anything touches a device."""
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, (os.environ.get("XLA_FLAGS"), "--xla_gpu_deterministic_ops=true"))
    )


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:  # absl's app defaults to INFO: JAX's backend probing
        absl_logging.set_verbosity(absl_logging.WARNING)  # ("no TPU") would open the screen
    from dpn_jax.errors import DpnJaxError
    from dpn_jax.train.config import validate_config

    try:
        validate_config(FLAGS.config)  # before JAX starts: a typo costs nothing
        if FLAGS.config.deterministic:
            request_deterministic_gpu_ops()
        initialize_distributed()
        from dpn_jax.runtime.compilation_cache import enable_compilation_cache
        from dpn_jax.train.trainer import train_and_evaluate

        enable_compilation_cache()
        metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (DpnJaxError, FloatingPointError) as error:  # the user's config, data or divergence
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    if metrics:  # the exported model's accuracy last: the EMA's when there is one
        ema = "eval_top1_ema" in metrics
        if ema:
            print(f"raw weights top-1: {100 * metrics['eval_top1']:.2f}% (not exported)")
        suffix = "_ema" if ema else ""
        print(
            f"final validation top-1 ({'EMA' if ema else 'raw'} weights, exported): "
            f"{100 * metrics['eval_top1' + suffix]:.2f}% "
            f"(top-5 {100 * metrics['eval_top5' + suffix]:.2f}%, {metrics['eval_examples']} images)"
        )
    return 0


if __name__ == "__main__":
    from dpn_jax.runtime.huge_pages import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    app.run(main)
