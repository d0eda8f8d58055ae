"""Train a DPN: `python train.py` runs the digits demo; see configs/ for ImageNet and fine-tuning.

    python train.py --config configs/imagenet.py:dpn92 --workdir runs/dpn92 \
        --config.batch_size=1024
Multi-host: run the same command on every host; `jax.distributed` initialises itself on Slurm
and Cloud TPU, or pass --coordinator_address / --num_processes / --process_id.
"""
import logging
import os

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Training config file (default: the digits demo).", lock_config=True)
flags.DEFINE_string("workdir", "runs/digits", "Checkpoints, logs and the exported model go here.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def initialize_distributed() -> None:
    """Join a multi-process run when the flags or the cluster (Slurm, Cloud TPU, ...) describe one.

    On CPU, cross-process collectives go through gloo.
    """
    import jax
    from jax._src import clusters  # the detection jax.distributed.initialize() itself uses

    explicit = FLAGS.coordinator_address is not None or FLAGS.num_processes is not None
    if not explicit and not any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    initialize_distributed()
    from dpn_jax.runtime.compilation_cache import enable_compilation_cache
    from dpn_jax.train.trainer import train_and_evaluate

    enable_compilation_cache()

    try:
        metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, OSError, FloatingPointError) as error:  # bad config, data or divergence
        raise SystemExit(f"train.py: error: {error}") from None
    if metrics:
        print(f"final validation top-1: {100 * metrics['eval_top1']:.2f}% "
              f"(top-5 {100 * metrics['eval_top5']:.2f}%, {metrics['eval_examples']} images)")
    return 0


if __name__ == "__main__":
    from dpn_jax.runtime.huge_pages import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    app.run(main)
