"""One device's training step, with explicit collectives over the runner's `batch` axis.

The state is replicated; each device differentiates its own copy of the parameters on its rows
of the batch (uint8 images, normalised, erased and mixed in the step), and the gradients are
averaged over the devices (`mean_over_devices`: nothing to do on one device), as are the
BatchNorm statistics (inside the model, built with the runner's `axis_name`) and the metrics.
A step whose loss or gradient is NaN/Inf changes nothing but `step` and records itself in
`nonfinite_step` (the trainer then stops or carries on, per `skip_nonfinite_updates`).
The gradient is tested through its global norm, which is NaN/Inf exactly when an element is (or
when the norm overflows float32, ~1.8e19, a diverged run anyway): one fused sum of squares,
where a per-leaf `all(isfinite(...))` made XLA compile the step several times longer
(BENCHMARKS.md, "Compile time of the train step").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from dpn_jax.data.batch_augment import Mixup, RandomErasing
from dpn_jax.data.transforms import normalize
from dpn_jax.infer.evaluate import top_k_correct
from dpn_jax.models.dpn import DPN
from dpn_jax.runtime.runner import AXIS, REPLICATED, SHARDED, Runner, mean_over_devices
from dpn_jax.train.state import TrainState


def classification_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    smoothing: float,
    bce: bool = False,
    bce_target_thresh: float | None = None,
) -> jax.Array:
    """timm train.py's training loss: mean softmax cross-entropy (`LabelSmoothingCrossEntropy`,
    `SoftTargetCrossEntropy`) or `BinaryCrossEntropy` over every logit.

    `labels` are class indices, smoothed here (on 1 - smoothing + smoothing / C, off
    smoothing / C: both timm losses' targets), or soft targets (B, C) that already carry their
    smoothing (timm's Mixup makes them so).
    """
    if labels.ndim == 1:
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        if smoothing:
            targets = optax.smooth_labels(targets, smoothing)
    else:
        targets = labels.astype(logits.dtype)
    if not bce:
        return optax.softmax_cross_entropy(logits, targets).mean()
    if bce_target_thresh is not None:
        targets = (targets > bce_target_thresh).astype(logits.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def lerp_ema(ema: dict, variables: dict, decay: jax.Array) -> dict:
    """timm's `ModelEmaV3` update `ema.lerp_(model, 1 - decay)`, in the EMA's own dtype."""
    return jax.tree.map(
        lambda new, old: (old + (1.0 - decay) * (new - old)).astype(old.dtype), variables, ema
    )


def ema_decay_at(update: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """timm `ModelEmaV3.get_decay(step=update)` for the 1-based optimizer update `update`: 0 at
    the first (the EMA starts as the weights), then `decay`, or with warm-up
    min(decay, 1 - (1 + n) ** -2/3) for n = update - 1."""
    n = jnp.maximum(update - 1, 0).astype(jnp.result_type(float))
    value = jnp.clip(1 - (1 + n) ** (-2 / 3), 0.0, decay) if warmup else jnp.full_like(n, decay)
    return jnp.where(n <= 0, 0.0, value)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the train step reads of the run's config (`dpn_jax.train.config.step_settings`),
    with timm train.py's names; the defaults leave each part off."""

    smoothing: float = 0.0  # label smoothing
    bce_loss: bool = False
    bce_target_thresh: float | None = None
    grad_accum_steps: int = 1
    ema_decay: float = 0.0  # 0: no EMA of the weights
    ema_warmup: bool = False
    erasing: RandomErasing | None = None  # device-side augmentations, None: off
    mixup: Mixup | None = None


def make_train_step(
    model: DPN,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    settings: StepSettings,
    mean,
    std,
) -> Callable:
    """`train_step(state, batch) -> (state, metrics)` for one device (see the module doc)."""
    accum, erasing, mixup = settings.grad_accum_steps, settings.erasing, settings.mixup

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_rng = jax.random.fold_in(
            jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
            lax.axis_index(AXIS),
        )
        images = normalize(batch["image"], mean, std, model.dtype)
        erase_key, mix_key = jax.random.split(jax.random.fold_in(dropout_rng, 1))
        targets = batch["label"]
        if erasing is not None:  # timm's order: normalise, erase, mix
            images = erasing(erase_key, images)
        if mixup is not None:
            images, targets = mixup(mix_key, images, targets)

        def loss_fn(params):
            logits, new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_rng},
            )
            loss = classification_loss(
                logits,
                targets,
                smoothing=settings.smoothing,
                bce=settings.bce_loss,
                bce_target_thresh=settings.bce_target_thresh,
            )
            return loss, (logits, new_vars)

        # This device's gradient (without the cast JAX would sum the gradients of a replicated
        # value over the devices itself); the mean over devices is explicit (none on one device).
        device_params = lax.pcast(state.params, AXIS, to="varying")
        (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(device_params)
        grads = mean_over_devices(grads)
        batch_stats = new_vars["batch_stats"]  # already averaged over AXIS by the BatchNorms
        updates_done = (state.step + 1) // accum  # optimizer updates after this step
        metrics = mean_over_devices(
            {"loss": loss, "top1": top_k_correct(logits, batch["label"], 1).mean()}
        )
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.tree.norm(grads))
        # The update inside the taken branch, so that it writes the donated state in place; a
        # `where` per leaf read and wrote the whole state once more, and an update computed
        # before the branch was copied into the state's buffers (BENCHMARKS.md, "The trainer's
        # step").
        new_state = lax.cond(
            finite,
            lambda: apply_update(tx, settings, state, grads, batch_stats, updates_done),
            lambda: state,
        )
        new_state = new_state.replace(
            step=state.step + 1,
            nonfinite_step=jnp.where(
                (state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step
            ),
        )
        metrics["lr"] = schedule(updates_done)  # as timm's optimizer holds it after the step
        return new_state, metrics

    return train_step


def apply_update(
    tx: optax.GradientTransformation,
    settings: StepSettings,
    state: TrainState,
    grads,
    batch_stats,
    updates_done: jax.Array,
) -> TrainState:
    """The state after one optimizer step (and EMA update) with the averaged gradients."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
        applied = tx.has_updated(opt_state) if isinstance(tx, optax.MultiSteps) else True
        decay = jnp.where(
            applied, ema_decay_at(updates_done, settings.ema_decay, settings.ema_warmup), 1.0
        )
        ema = lerp_ema(ema, {"params": params, "batch_stats": batch_stats}, decay)
    return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema)


def compile_train_step(runner: Runner, train_step: Callable) -> Callable:
    """One device's `train_step` (`make_train_step`'s) over the runner's devices: (replicated
    state, sharded batch) -> (replicated state, replicated metrics), the state donated (updated
    in place)."""
    return runner.compile(
        train_step,
        in_specs=(REPLICATED, SHARDED),
        out_specs=(REPLICATED, REPLICATED),
        donate_argnums=(0,),
    )
