"""The compiled train step's program: what XLA makes of it, read from the optimised HLO.

Kept apart from test_train.py's numbers: these tests fail on a change of the program's cost
(a copy of the state per step) that leaves its results unchanged.
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest
from train_worker import TINY, tiny_config

from dpn_jax import create_model
from dpn_jax.infer.evaluate import compile_eval_step
from dpn_jax.runtime.runner import Runner
from dpn_jax.train.config import train_settings
from dpn_jax.train.optim import create_optimizer
from dpn_jax.train.state import create_train_state
from dpn_jax.train.step import compile_train_step, make_train_step


def branch_copies(hlo: str) -> list[str]:
    """Result shapes of the `copy` instructions in the branches of the step's conditional (the
    finiteness check that skips a non-finite update)."""
    (cond,) = [line for line in hlo.splitlines() if " conditional(" in line]
    branches = re.findall(r"%([\w.\-]+)", re.search(r"branch_computations=\{([^}]*)\}", cond)[1])
    bodies = {
        m[1]: m[2] for m in re.finditer(r"^%([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S)
    }
    return [
        shape
        for name in branches
        for shape in re.findall(r"= (\w+\[[\d,]*\])\S* copy\(", bodies[name])
    ]


@functools.cache
def compiled_steps(num_devices: int) -> tuple[str, str, dict]:
    """The optimised HLO of the train step (EMA on) and of the eval step over the first
    `num_devices` devices, with the model built as the trainer builds it, and its variables."""
    config = tiny_config(ema_decay=0.9)
    runner = Runner("shard_map", jax.devices()[:num_devices])
    model, variables = create_model(
        "dpn68", num_classes=10, axis_name=runner.axis_name, rng=jax.random.key(0), **TINY
    )
    settings = train_settings(config, steps_per_epoch=10, num_classes=10)
    tx, schedule = create_optimizer(settings.optimizer, settings.schedule)
    state = runner.replicate(create_train_state(variables, tx, seed=0, use_ema=True))
    rows = 4 * num_devices
    images, labels = np.zeros((rows, 32, 32, 3), np.uint8), np.zeros(rows, np.int32)
    batch = runner.put_batch({"image": images, "label": labels})
    mean, std = (0.5,) * 3, (0.25,) * 3
    step = compile_train_step(
        runner, make_train_step(model, tx, schedule, settings.step, mean, std)
    )
    eval_batch = runner.put_batch({"image": images, "label": labels, "mask": labels == 0})
    eval_step = compile_eval_step(runner, model, mean, std)
    return (
        step.lower(state, batch).compile().as_text(),
        eval_step.lower(runner.replicate(variables), eval_batch).compile().as_text(),
        variables,
    )


def collectives(hlo: str) -> int:
    """Cross-device instructions (all-reduce and its async start, all-gather, ...) anywhere."""
    return len(
        re.findall(r" (?:all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(", hlo)
    )


def test_update_writes_the_donated_state_without_a_copy():
    """The optimizer update and EMA are computed inside the branch taken on a finite step, so
    they write the donated state's buffers in place. Computed before the branch, every leaf of
    params, momentum and EMA was copied into those buffers once per step (BENCHMARKS.md, "The
    trainer's step"); the BatchNorm statistics, computed by the forward pass, still are."""
    hlo, _, variables = compiled_steps(1)

    copies = branch_copies(hlo)
    stats = {f"f32[{leaf.shape[0]}]" for leaf in jax.tree.leaves(variables["batch_stats"])}
    kernels = [s for s in copies if s.count(",") >= 1]  # rank >= 2: conv and linear kernels
    assert not kernels, f"{len(kernels)} kernel-shaped copies, e.g. {kernels[:3]}"
    # and the classifier's bias (10 floats), which XLA copies on one device since the loss
    # fuses with no all-reduce in between
    small = stats | {"s32[]", "f32[]", "u32[2]", "f32[10]"}
    assert set(copies) <= small, sorted(set(copies) - small)


@pytest.mark.parametrize("num_devices", [1, 4])
def test_collectives_only_over_several_devices(num_devices):
    """On one device the steps average nothing: no all-reduce for the BatchNorm moments (forward
    and backward), the gradient, the metrics or the eval sums. XLA CPU still ran each one there,
    and no fusion crosses one (BENCHMARKS.md, "The trainer's step"). Over 4 devices they stay."""
    train_hlo, eval_hlo, _ = compiled_steps(num_devices)
    if num_devices == 1:
        assert (collectives(train_hlo), collectives(eval_hlo)) == (0, 0)
    else:  # XLA combines independent all-reduces: fewer than one per BatchNorm and gradient
        assert collectives(train_hlo) > 10 and collectives(eval_hlo) >= 1
