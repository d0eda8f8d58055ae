"""One device's SGD step, with explicit collectives over the runner's `batch` axis."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from dpn_jax.data.transforms import normalize
from dpn_jax.infer.evaluate import top_k_correct
from dpn_jax.models.dpn import DPN
from dpn_jax.runtime.runner import AXIS, REPLICATED, SHARDED, Runner
from dpn_jax.train.state import TrainState


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Mean softmax cross-entropy against (optionally smoothed) one-hot labels."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def make_train_step(
    model: DPN,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    mean,
    std,
) -> Callable:
    """`train_step(state, batch) -> (state, metrics)` for one device of the runner.

    The state is replicated; each device differentiates its own copy of the parameters on its
    rows of the batch (uint8 images, normalised here), and the gradients are averaged over the
    devices (`pmean`), as are the BatchNorm statistics (inside the model) and the metrics. A step
    whose loss or gradient is NaN/Inf changes nothing but `step` and records itself in
    `nonfinite_step` (the trainer then stops or carries on, per `config.skip_nonfinite_updates`).
    The gradient is tested through its global norm, which is NaN/Inf exactly when an element is
    (or when the norm overflows float32, ~1.8e19, a diverged run anyway): one fused sum of
    squares, where a per-leaf `all(isfinite(...))` made XLA compile the step several times
    longer (BENCHMARKS.md, "Compile time of the train step").
    """
    accum = config.grad_accum_steps

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_rng = jax.random.fold_in(
            jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
            lax.axis_index(AXIS),
        )
        images = normalize(batch["image"], mean, std, model.dtype)

        def loss_fn(params):
            logits, new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_rng},
            )
            return cross_entropy(logits, batch["label"], config.label_smoothing), (logits, new_vars)

        # This device's gradient (without the cast JAX would sum the gradients of a replicated
        # value over the devices itself); the mean over devices is the explicit `pmean`.
        device_params = lax.pcast(state.params, AXIS, to="varying")
        (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(device_params)
        grads = lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        batch_stats = new_vars["batch_stats"]  # already averaged over AXIS by the BatchNorms

        ema = state.ema
        if ema is not None:
            applied = tx.has_updated(opt_state) if isinstance(tx, optax.MultiSteps) else True
            decay = jnp.where(applied, config.ema_decay, 1.0)
            ema = optax.incremental_update(
                {"params": params, "batch_stats": batch_stats}, ema, step_size=1.0 - decay
            )

        metrics = lax.pmean(
            {"loss": loss, "top1": top_k_correct(logits, batch["label"], 1).mean()}, AXIS
        )
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.global_norm(grads))
        updated = state.replace(
            params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema
        )
        # A branch, not a `where` per leaf: the select read and wrote the whole state once more
        # each step (BENCHMARKS.md, "Compile time of the train step").
        new_state = lax.cond(finite, lambda: updated, lambda: state)
        new_state = new_state.replace(
            step=state.step + 1,
            nonfinite_step=jnp.where(
                (state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step
            ),
        )
        metrics["lr"] = schedule(state.step // accum)
        return new_state, metrics

    return train_step


def compile_train_step(
    runner: Runner,
    model: DPN,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    mean,
    std,
) -> Callable:
    """`make_train_step` over the runner's devices: (replicated state, sharded batch) ->
    (replicated state, replicated metrics), the state donated (updated in place)."""
    return runner.compile(
        make_train_step(model, tx, schedule, config, mean, std),
        in_specs=(REPLICATED, SHARDED),
        out_specs=(REPLICATED, REPLICATED),
        donate_argnums=(0,),
    )
