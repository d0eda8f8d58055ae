"""Runs `train_and_evaluate` in a subprocess for tests/test_train_distributed.py.

    python tests/train_worker.py WORKDIR '{"num_train_steps": 8}' [--kill-after-checkpoint N]
        [--synthetic-data] [--poison-step K] [--coordinator HOST:PORT --num-processes P --process-id I]

`--synthetic-data` replaces the training stream by global batches that depend only on the step,
each process taking its slice, so runs with different process counts see the same global batch.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = dict(k_sec=(1, 1, 1, 1), k_r=16, groups=2, num_init_features=8, inc_sec=(4, 4, 4, 4))


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


# A constant schedule keeps the step's program independent of the run length.
WORKER_SETTINGS = dict(schedule="constant", learning_rate=0.05, log_every_steps=1)


def synthetic_train_batches(spec, *, batch_size, start_batch=0, **_):
    """uint8 images that depend only on the step, this process's slice of the global batch."""
    import jax
    count, index = jax.process_count(), jax.process_index()
    step = start_batch
    while True:
        rng = np.random.RandomState(step)
        labels = rng.randint(0, 10, batch_size * count).astype(np.int32)
        images = rng.normal(128, 40, (len(labels), 32, 32, 3))
        images += (labels[:, None, None, None] - 4.5) * 10
        images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        part = slice(index * batch_size, (index + 1) * batch_size)
        yield {"image": images[part], "label": labels[part]}
        step += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("overrides", type=json.loads)
    parser.add_argument("--kill-after-checkpoint", type=int)
    parser.add_argument("--poison-step", type=int)
    parser.add_argument("--synthetic-data", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()

    import jax
    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from dpn_jax.data import pipeline
    from dpn_jax.train import trainer

    if args.synthetic_data:
        pipeline.train_batches = synthetic_train_batches
    if args.poison_step is not None:
        real = pipeline.train_batches

        def poisoned(*a, start_batch=0, **kw):  # float images: uint8 cannot hold a NaN
            for i, batch in enumerate(real(*a, start_batch=start_batch, **kw), start=start_batch):
                batch["image"] = batch["image"].astype(np.float32)
                if i == args.poison_step:
                    batch["image"][0, 0, 0, 0] = np.nan
                yield batch

        pipeline.train_batches = poisoned
    if args.kill_after_checkpoint is not None:
        save = trainer.save_checkpoint

        def save_then_die(manager, state, meta):
            save(manager, state, meta)
            if int(state.step) == args.kill_after_checkpoint:
                manager.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.save_checkpoint = save_then_die

    metrics = trainer.train_and_evaluate(tiny_config(**{**WORKER_SETTINGS, **args.overrides}), args.workdir)
    print("METRICS " + json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main()
