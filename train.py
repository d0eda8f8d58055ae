"""Train a DPN: `python train.py` runs the digits demo; see configs/ for ImageNet and fine-tuning.

    python train.py --config configs/imagenet.py:dpn92 --workdir runs/dpn92 \
        --config.batch_size=1024
Multi-host: run the same command on every host; under Slurm or Open MPI (or with JAX's
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) `jax.distributed` finds the
others by itself, else pass --coordinator_address / --num_processes / --process_id.

SIGTERM / SIGINT during training saves a checkpoint and exits 0 (the same command resumes).
Before training starts (imports, start-up checks, compilation) there is nothing to save: one
line says so and the exit status is the shell's for the signal, 128 + its number (130, 143).
"""

import os
import signal
import sys

from dpn_jax.system.interrupts import SignalInterrupt, hold_interrupts, release_interrupts

if __name__ == "__main__":  # first of all: the imports below and JAX's start take seconds
    hold_interrupts(signal.SIGINT, signal.SIGTERM)  # until released under the `try` at the end

import contextlib  # noqa: E402

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

PROG = "train.py"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")
EXIT_ERROR = 1


def config_file_argument(argv: list[str]) -> str:
    """The --config value on the command line (PATH or PATH:ARG), else the default."""
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def base_config(argv: list[str]):
    """The config file's config, without the command line's overrides."""
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    return ConfigFileFlagParser(name="config").parse(config_file_argument(argv))


@contextlib.contextmanager
def overrides_reported(argv: list[str]):
    """ml_collections applies --config.KEY overrides while parsing (with the default config
    file, already when the flag is defined); one of no key is one line naming the closest."""
    try:
        yield
    except (AttributeError, KeyError) as error:
        from dpn_jax.cli.common import report_error
        from dpn_jax.errors import first_line
        from dpn_jax.train.config import unknown_key_message

        config = base_config(argv)
        overrides = (a.split("=", 1)[0].split(".", 1)[1] for a in argv if a.startswith("--config."))
        messages = filter(None, (unknown_key_message(config, path) for path in overrides))
        report_error(PROG, next(messages, first_line(error)))
        sys.exit(EXIT_ERROR)


FLAGS = flags.FLAGS
with overrides_reported(sys.argv):
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Training config file (default: the demo).", lock_config=True
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


def print_help(argv: list[str]) -> None:
    from dpn_jax.train.config import architecture_meanings, describe_keys, key_meanings

    print(__doc__.strip(), end="\n\n")
    print(FLAGS.main_module_help())
    with open(DEFAULT_CONFIG, encoding="utf-8") as file:
        meanings = {**key_meanings(file.read()), **architecture_meanings()}
    print(f"\nConfig keys (--config.KEY=VALUE; the defaults of {config_file_argument(argv)}):")
    print("\n".join(f"  {line}" for line in describe_keys(base_config(argv), meanings)))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with --help exiting 0 with the config keys, and a mistyped flag or
    config key reported in one line naming the closest valid key."""
    from dpn_jax.cli.common import report_error

    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print_help(argv)
        sys.exit(0)
    try:
        with overrides_reported(argv):
            return FLAGS(argv)
    except flags.Error as error:
        report_error(PROG, str(error))
        sys.exit(EXIT_ERROR)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:  # absl's app defaults to INFO: JAX's backend probing
        absl_logging.set_verbosity(absl_logging.WARNING)  # ("no TPU") would open the screen
    from dpn_jax.cli.common import report_error
    from dpn_jax.errors import DpnJaxError
    from dpn_jax.train.config import validate_config

    try:
        validate_config(FLAGS.config)  # before JAX starts: a typo costs nothing
        if FLAGS.config.deterministic:
            request_deterministic_gpu_ops()
        initialize_distributed()
        from dpn_jax.system.compilation_cache import enable_compilation_cache
        from dpn_jax.train.trainer import train_and_evaluate

        enable_compilation_cache()
        train_and_evaluate(FLAGS.config, FLAGS.workdir)  # says how it ended
    except (DpnJaxError, FloatingPointError) as error:  # the user's config, data or divergence
        report_error(PROG, str(error))
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    try:
        release_interrupts()
        app.run(main, flags_parser=parse_flags)
    except SignalInterrupt as interrupt:  # before the trainer's own handler (dpn_jax.train.stop)
        print(f"{PROG}: interrupted before training started, nothing saved", file=sys.stderr)
        sys.exit(128 + interrupt.signum)
