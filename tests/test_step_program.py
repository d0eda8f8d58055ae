"""The compiled train step's program: what XLA makes of it, read from the optimised HLO.

Kept apart from test_train.py's numbers: these tests fail on a change of the program's cost
(a copy of the state per step) that leaves its results unchanged.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from train_worker import TINY, tiny_config

from dpn_jax import create_model
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


def test_update_writes_the_donated_state_without_a_copy():
    """The optimizer update and EMA are computed inside the branch taken on a finite step, so
    they write the donated state's buffers in place. Computed before the branch, every leaf of
    params, momentum and EMA was copied into those buffers once per step (BENCHMARKS.md, "The
    trainer's step"); the BatchNorm statistics, computed by the forward pass, still are."""
    config = tiny_config(ema_decay=0.9)
    model, variables = create_model(
        "dpn68", num_classes=10, axis_name="batch", rng=jax.random.key(0), **TINY
    )
    settings = train_settings(config, steps_per_epoch=10, num_classes=10)
    tx, schedule = create_optimizer(settings.optimizer, settings.schedule)
    runner = Runner("shard_map", jax.devices()[:1])
    state = runner.replicate(create_train_state(variables, tx, seed=0, use_ema=True))
    batch = runner.put_batch(
        {"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.zeros(4, np.int32)}
    )
    step = compile_train_step(
        runner, make_train_step(model, tx, schedule, settings.step, (0.5,) * 3, (0.25,) * 3)
    )
    hlo = step.lower(state, batch).compile().as_text()

    copies = branch_copies(hlo)
    stats = {f"f32[{leaf.shape[0]}]" for leaf in jax.tree.leaves(variables["batch_stats"])}
    kernels = [s for s in copies if s.count(",") >= 1]  # rank >= 2: conv and linear kernels
    assert not kernels, f"{len(kernels)} kernel-shaped copies, e.g. {kernels[:3]}"
    assert set(copies) <= stats | {"s32[]", "f32[]", "u32[2]"}, sorted(set(copies) - stats)
