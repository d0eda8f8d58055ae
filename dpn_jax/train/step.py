"""One device's training step, with explicit collectives over the runner's `batch` axis."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from dpn_jax.data.batch_augment import Mixup, RandomErasing
from dpn_jax.data.transforms import normalize
from dpn_jax.infer.evaluate import top_k_correct
from dpn_jax.models.dpn import DPN
from dpn_jax.runtime.runner import AXIS, REPLICATED, SHARDED, Runner
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


def ema_decay_at(update: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """timm `ModelEmaV3.get_decay(step=update)` for the 1-based optimizer update `update`: 0 at
    the first (the EMA starts as the weights), then `decay`, or with warm-up
    min(decay, 1 - (1 + n) ** -2/3) for n = update - 1."""
    n = jnp.maximum(update - 1, 0).astype(jnp.result_type(float))
    value = jnp.clip(1 - (1 + n) ** (-2 / 3), 0.0, decay) if warmup else jnp.full_like(n, decay)
    return jnp.where(n <= 0, 0.0, value)


def mixup_active(config: ml_collections.ConfigDict) -> bool:
    """timm train.py's `mixup_active`."""
    return config.mixup > 0 or config.cutmix > 0 or config.cutmix_minmax is not None


def batch_augmentations(
    config: ml_collections.ConfigDict, num_classes: int
) -> tuple[RandomErasing | None, Mixup | None]:
    """timm's device-side train augmentations as train.py configures them (None: off)."""
    erasing = (
        RandomErasing(probability=config.reprob, mode=config.remode, max_count=config.recount)
        if config.reprob > 0
        else None
    )
    mixup = (
        Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            cutmix_minmax=config.cutmix_minmax,
            prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob,
            mode=config.mixup_mode,
            label_smoothing=config.smoothing,
            num_classes=num_classes,
        )
        if mixup_active(config)
        else None
    )
    return erasing, mixup


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
    rows of the batch (uint8 images, normalised, erased and mixed here), and the gradients are
    averaged over the devices (`pmean`), as are the BatchNorm statistics (inside the model) and
    the metrics. A step whose loss or gradient is NaN/Inf changes nothing but `step` and
    records itself in `nonfinite_step` (the trainer then stops or carries on, per
    `config.skip_nonfinite_updates`).
    The gradient is tested through its global norm, which is NaN/Inf exactly when an element is
    (or when the norm overflows float32, ~1.8e19, a diverged run anyway): one fused sum of
    squares, where a per-leaf `all(isfinite(...))` made XLA compile the step several times
    longer (BENCHMARKS.md, "Compile time of the train step").
    """
    accum = config.grad_accum_steps
    erasing, mixup = batch_augmentations(config, model.num_classes)

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
                smoothing=config.smoothing,
                bce=config.bce_loss,
                bce_target_thresh=config.bce_target_thresh,
            )
            return loss, (logits, new_vars)

        # This device's gradient (without the cast JAX would sum the gradients of a replicated
        # value over the devices itself); the mean over devices is the explicit `pmean`.
        device_params = lax.pcast(state.params, AXIS, to="varying")
        (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(device_params)
        grads = lax.pmean(grads, AXIS)
        batch_stats = new_vars["batch_stats"]  # already averaged over AXIS by the BatchNorms
        updates_done = (state.step + 1) // accum  # optimizer updates after this step

        def update() -> TrainState:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = state.ema
            if ema is not None:
                applied = tx.has_updated(opt_state) if isinstance(tx, optax.MultiSteps) else True
                decay = jnp.where(
                    applied, ema_decay_at(updates_done, config.ema_decay, config.ema_warmup), 1.0
                )
                ema = jax.tree.map(  # timm's lerp_(model, 1 - decay), in the EMA's own dtype
                    lambda new, old: (old + (1.0 - decay) * (new - old)).astype(old.dtype),
                    {"params": params, "batch_stats": batch_stats},
                    ema,
                )
            return state.replace(
                params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema
            )

        metrics = lax.pmean(
            {"loss": loss, "top1": top_k_correct(logits, batch["label"], 1).mean()}, AXIS
        )
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.global_norm(grads))
        # The update inside the taken branch, so that it writes the donated state in place; a
        # `where` per leaf read and wrote the whole state once more, and an update computed
        # before the branch was copied into the state's buffers (BENCHMARKS.md, "The trainer's
        # step").
        new_state = lax.cond(finite, update, lambda: state)
        new_state = new_state.replace(
            step=state.step + 1,
            nonfinite_step=jnp.where(
                (state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step
            ),
        )
        metrics["lr"] = schedule(updates_done)  # as timm's optimizer holds it after the step
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
