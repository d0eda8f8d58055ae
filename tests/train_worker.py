"""Runs `train_and_evaluate` in a subprocess for the trainer tests, with faults injected on request.

    python tests/train_worker.py WORKDIR '{"num_train_steps": 8}' [--synthetic-data]
        [--poison-step K] [--kill-after-checkpoint N] [--stall-data-after N]
        [--block-reads-after N]
        [--disk-full-after-checkpoint N] [--print-restored]
        [--coordinator HOST:PORT --num-processes P --process-id I]

`--synthetic-data` replaces the training stream by global batches that depend only on the step,
each process taking its rows, so runs with different process counts see the same global batch.
The last line of a successful run is `METRICS {json}`. The faults go in through the trainer's
`TrainHooks` (the training stream, the per-device step, after a restore or a save); only
`--block-reads-after` patches a class, the dataset's records, to block in the pipeline's own
reader threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = dict(k_sec=(1, 1, 1, 1), k_r=16, groups=2, num_init_features=8, inc_sec=(4, 4, 4, 4))
# A constant schedule keeps the step's program independent of the run length.
WORKER_SETTINGS = dict(schedule="constant", learning_rate=0.05, log_every_steps=1)
POISON_VALUE = 7  # a batch whose first image is all 7s makes the step's input NaN
STALLED_MARKER = "stalled"  # written into WORKDIR when --stall-data-after starts waiting
DISK_LIMIT_BYTES = 64 << 10


def tiny_config(**overrides):
    """The demo config shrunk to a tiny DPN on 32 px images (shared by the trainer tests)."""
    from configs import default

    config = default.get_config()
    config.model_kwargs = TINY
    config.image_size = 32
    config.batch_size = 32
    config.base_batch_size = 32
    config.eval_batch_size = 40
    config.warmup_epochs = 0.0
    config.update(overrides)
    return config


class SyntheticBatches:
    """Global uint8 batches that depend only on the step; this process takes its rows."""

    def __init__(self, spec, *, batch_size, **_):
        import jax

        self.count, self.index, self.batch_size = (
            jax.process_count(),
            jax.process_index(),
            batch_size,
        )
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.RandomState(self.step)
        labels = rng.randint(0, 10, self.batch_size * self.count).astype(np.int32)
        images = (
            rng.normal(128, 40, (len(labels), 32, 32, 3)) + (labels[:, None, None, None] - 4.5) * 12
        )
        images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        part = slice(self.index * self.batch_size, (self.index + 1) * self.batch_size)
        self.step += 1
        return {"image": images[part], "label": labels[part]}

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]


class Wrapped:
    """Another pipeline's batches, numbered from 1 in the stream, with `on_batch(number, batch)`
    applied. Its state is the inner pipeline's, so a run without the wrapper resumes from it."""

    def __init__(self, inner, on_batch):
        self.inner, self.on_batch, self.number = inner, on_batch, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.number += 1
        self.on_batch(self.number, batch)
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)
        self.number = state["next_batch"] if "next_batch" in state else state["step"]


def wrapped(source, on_batch):
    """The training-stream factory `source` with `on_batch` applied to each batch (`Wrapped`)."""
    return lambda *args, **kwargs: Wrapped(source(*args, **kwargs), on_batch)


def poisoned(train_step):
    """One device's train step given NaN images when its first image is all POISON_VALUE
    (uint8 cannot hold NaN; the step normalises float images as it does uint8 ones)."""
    import jax.numpy as jnp

    def step(state, batch):
        images = batch["image"]
        poison = jnp.all(images[0] == POISON_VALUE)
        images = jnp.where(poison, jnp.nan, images.astype(jnp.float32))
        return train_step(state, dict(batch, image=images))

    return step


def after_checkpoint(step: int, action):
    """An `after_save` hook running `action()` once the checkpoint of `step` is on disk."""

    def hook(checkpoints, saved_step):
        if saved_step == step:
            checkpoints.wait()
            action()

    return hook


def block_reads_after(count: int, marker: str) -> None:
    """Every record read after the first `count` blocks forever in the pipeline's reader
    threads, as a read of a FIFO or of a hung network filesystem does (`marker` is written)."""
    import threading

    from dpn_jax.data.records import InMemoryRecords

    read = InMemoryRecords.__getitem__
    reads = iter(range(count))

    def blocking_read(self, index):
        if next(reads, None) is None:
            open(marker, "w").close()
            threading.Event().wait()
        return read(self, index)

    InMemoryRecords.__getitem__ = blocking_read


def digest(tree) -> str:
    """A short hash of a tree's values (global arrays: this process's copy; or numpy)."""
    import jax

    leaves = [
        np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        for leaf in jax.tree.leaves(tree)
    ]
    return hashlib.sha256(b"".join(leaf.tobytes() for leaf in leaves)).hexdigest()[:16]


def print_restored(state) -> None:
    """An `after_restore` hook: `RESTORED STEP DIGEST` of the state a run resumes from."""
    step = int(np.asarray(state.step.addressable_data(0)))
    print(f"RESTORED {step} {digest(state.params)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("overrides", type=json.loads)
    parser.add_argument("--synthetic-data", action="store_true")
    parser.add_argument("--poison-step", type=int)
    parser.add_argument("--kill-after-checkpoint", type=int)
    parser.add_argument("--stall-data-after", type=int)
    parser.add_argument("--block-reads-after", type=int)
    parser.add_argument("--disk-full-after-checkpoint", type=int)
    parser.add_argument("--print-restored", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()

    import jax

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from dpn_jax.data import pipeline
    from dpn_jax.errors import DpnJaxError
    from dpn_jax.train import trainer

    hooks = trainer.TrainHooks(
        train_batches=SyntheticBatches if args.synthetic_data else pipeline.train_batches
    )
    if args.poison_step is not None:

        def poison(number, batch):
            if number == args.poison_step + 1:
                batch["image"][0] = POISON_VALUE

        hooks = dataclasses.replace(
            hooks, train_batches=wrapped(hooks.train_batches, poison), wrap_step=poisoned
        )
    if args.stall_data_after is not None:

        def stall(number, batch):
            if number > args.stall_data_after:
                open(os.path.join(args.workdir, STALLED_MARKER), "w").close()
                while True:
                    time.sleep(1)

        hooks = dataclasses.replace(hooks, train_batches=wrapped(hooks.train_batches, stall))
    if args.block_reads_after is not None:
        block_reads_after(args.block_reads_after, os.path.join(args.workdir, STALLED_MARKER))
    if args.kill_after_checkpoint is not None:
        kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
        hooks = dataclasses.replace(
            hooks, after_save=after_checkpoint(args.kill_after_checkpoint, kill)
        )
    if args.disk_full_after_checkpoint is not None:

        def fill_disk():  # no file may grow past the limit: writes fail as on a full disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_LIMIT_BYTES, DISK_LIMIT_BYTES))

        hooks = dataclasses.replace(
            hooks, after_save=after_checkpoint(args.disk_full_after_checkpoint, fill_disk)
        )
    if args.print_restored:
        hooks = dataclasses.replace(hooks, after_restore=print_restored)

    try:
        metrics = trainer.train_and_evaluate(
            tiny_config(**{**WORKER_SETTINGS, **args.overrides}), args.workdir, hooks
        )
    except DpnJaxError as error:  # as train.py reports it
        print(f"train_worker: error: {error}", file=sys.stderr)
        sys.exit(1)
    print("METRICS " + json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main()
