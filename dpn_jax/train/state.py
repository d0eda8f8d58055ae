"""The train state: everything besides the data position that a run needs to continue exactly.

It is created on the host (numpy) and lives on the devices as replicated global arrays
(`Runner.replicate`); `dpn_jax.train.checkpoints` saves and restores it.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.struct
import flax.traverse_util
import jax
import numpy as np
import optax

from dpn_jax.errors import WeightsError

log = logging.getLogger(__name__)

Variables = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: batches consumed so far
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    ema: Variables | None  # {"params", "batch_stats"} averaged, or None without EMA
    rng: jax.Array  # raw uint32[2] key; folded with step and device for dropout
    nonfinite_step: jax.Array  # int32: first step whose loss/gradient was NaN/Inf, -1 if none

    def variables(self, ema: bool = False) -> Variables:
        source = self.ema if ema else {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": source["params"], "batch_stats": source["batch_stats"]}


def create_train_state(
    variables: Variables, tx: optax.GradientTransformation, *, seed: int, use_ema: bool
) -> TrainState:
    """A fresh state on the host (numpy leaves) from initial model variables."""
    variables = jax.device_get(variables)
    params, batch_stats = variables["params"], variables["batch_stats"]
    state = TrainState(
        step=np.int32(0),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema={"params": params, "batch_stats": batch_stats} if use_ema else None,
        rng=np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32),
        nonfinite_step=np.int32(-1),
    )
    return jax.tree.map(np.asarray, state)


def merge_for_finetuning(fresh: Variables, loaded: Variables, source: str) -> Variables:
    """Fresh `variables` overwritten with a converted/exported model's weights.

    Every tensor is taken from `loaded`, except a classifier of another shape (a new
    `num_classes`), which keeps its fresh initialisation. Any other mismatch is an error naming
    the tensor (WeightsError: the user's `init_from` does not fit the model).
    """
    fresh_flat = flax.traverse_util.flatten_dict(jax.device_get(fresh), sep="/")
    loaded_flat = flax.traverse_util.flatten_dict(jax.device_get(loaded), sep="/")
    missing = sorted(set(fresh_flat) - set(loaded_flat))
    if missing:
        raise WeightsError(
            f"{source}: no tensor {missing[0]} ({len(missing)} missing); "
            "was it exported from the same architecture and model_kwargs?"
        )
    merged, reset = {}, []
    for name, fresh_value in fresh_flat.items():
        value = np.asarray(loaded_flat[name])
        if value.shape != fresh_value.shape:
            if not name.startswith("params/classifier/"):
                raise WeightsError(
                    f"{source}: tensor {name} has shape {value.shape}, "
                    f"the model expects {fresh_value.shape}"
                )
            reset.append(name)
            value = np.asarray(fresh_value)
        merged[name] = value
    if reset:
        log.info("fine-tuning from %s with a new classifier head (%s)", source, ", ".join(reset))
    return flax.traverse_util.unflatten_dict(merged, sep="/")
