"""The DPN recipe's optimizer: SGD with momentum, masked weight decay, LR schedules, accumulation.

Weight decay is coupled L2 added to the gradient before momentum, as PyTorch's `SGD(weight_decay=)`
that trained the reference models, and applies only to parameters whose path matches
`weight_decay_pattern` (conv and dense kernels, not BatchNorm scales/offsets or biases).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "step", "constant")


def scaled_learning_rate(config: ml_collections.ConfigDict) -> float:
    """`learning_rate` is given at `base_batch_size`; scale it linearly to the effective batch."""
    effective_batch = config.batch_size * config.get("grad_accum_steps", 1)
    return config.learning_rate * effective_batch / config.base_batch_size


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, updates_per_epoch: int
) -> optax.Schedule:
    """LR per optimizer update: linear warmup then cosine, step (piecewise) or constant."""
    peak = scaled_learning_rate(config)
    total = max(1, int(config.num_epochs * updates_per_epoch))
    warmup = min(int(config.warmup_epochs * updates_per_epoch), total - 1)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=total,
            end_value=peak * config.get("final_lr_fraction", 0.0),
        )
    if config.schedule == "step":
        boundaries = {
            int(epoch * updates_per_epoch): config.step_decay_factor
            for epoch in config.step_decay_epochs
        }
        decayed = optax.piecewise_constant_schedule(peak, boundaries)
    elif config.schedule == "constant":
        decayed = optax.constant_schedule(peak)
    else:
        raise ValueError(f"schedule={config.schedule!r}; choose from {SCHEDULES}")
    if not warmup:
        return decayed
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), lambda step: decayed(step + warmup)], [warmup]
    )


def path_mask(params: Any, pattern: str) -> Any:
    """True for the leaves whose '/'-joined path fully matches `pattern` (big_vision style)."""
    regex = re.compile(pattern)

    def matches(path, _leaf) -> bool:
        return bool(regex.fullmatch("/".join(str(getattr(k, "key", k)) for k in path)))

    return jax.tree_util.tree_map_with_path(matches, params)


def create_optimizer(
    config: ml_collections.ConfigDict, updates_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD (momentum, optional Nesterov) with masked L2, in `optax.MultiSteps` if accumulating.

    Returns the transformation and the LR schedule (indexed by optimizer update, for logging).
    """
    schedule = create_learning_rate_schedule(config, updates_per_epoch)
    tx = optax.chain(
        optax.add_decayed_weights(
            config.weight_decay, mask=lambda p: path_mask(p, config.weight_decay_pattern)
        ),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    )
    if config.get("grad_accum_steps", 1) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return tx, schedule
