"""timm's optimizers, gradient clipping and LR schedulers, with timm's names and semantics.

The run length is decided once (`RunLength`) and everything reads it: the loop, the progress bar
and the LR schedule (`ScheduleSettings`, timm's `create_scheduler_v2` arguments in optimizer
updates). Weight decay applies only to parameters whose path matches `weight_decay_pattern`
(conv and dense kernels: timm's `param_groups_weight_decay` leaves out BatchNorm and biases);
it is coupled L2 for SGD and RMSpropTF and decoupled for AdamW and LAMB, as the torch/timm
optimizers do. `tests/test_torch_parity.py` runs the same steps in PyTorch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "step", "multistep", "constant")
OPTIMIZERS = ("sgd", "nesterov", "momentum", "adamw", "lamb", "rmsproptf")
CLIP_MODES = ("norm", "value", "agc")
# timm's defaults where `opt_eps` / `opt_betas` are unset (torch.optim.AdamW, timm's Lamb and
# RMSpropTF).
DEFAULT_EPS = {"adamw": 1e-8, "lamb": 1e-6, "rmsproptf": 1e-10}
DEFAULT_BETAS = (0.9, 0.999)


@dataclasses.dataclass(frozen=True)
class RunLength:
    """How long the run is, in batches: `num_train_steps` if > 0, else `num_epochs` (plus
    timm's `cooldown_epochs`) of the training split."""

    steps_per_epoch: int
    total_steps: int
    grad_accum_steps: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, steps_per_epoch: int) -> RunLength:
        if config.num_train_steps > 0:
            total = config.num_train_steps
        else:
            epochs = config.num_epochs + config.cooldown_epochs
            total = max(1, int(epochs * steps_per_epoch))
        return cls(steps_per_epoch, total, config.grad_accum_steps)

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer updates per epoch, rounded up as timm's train.py does."""
        return -(-self.steps_per_epoch // self.grad_accum_steps)

    @property
    def total_updates(self) -> int:
        return self.total_steps // self.grad_accum_steps


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
    """timm's scheduler (`create_scheduler_v2`, warmup not prefixed) for one run.

    Times are in the schedule's unit: optimizer updates (timm's `sched_on_updates`) or whole
    epochs. A warm-up longer than half the run (a short test of a recipe) is cut to half, so
    the run still ends at the schedule's end value. Fields a schedule kind does not read are
    None, so two settings are equal exactly when they give the same LR at every update (what a
    resumed run must keep).
    """

    sched: str
    lr: float  # peak, scaled to the effective batch
    warmup_lr: float
    warmup_t: float
    on_updates: bool
    updates_per_epoch: int
    min_lr: float | None = None  # cosine
    t_initial: float | None = None  # cosine: the run minus cooldown
    end_update: int | None = None  # cosine per epoch: reaches min_lr at the run's last update
    decay_t: float | None = None  # step
    decay_milestones: tuple[float, ...] | None = None  # multistep
    decay_rate: float | None = None  # step, multistep

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, length: RunLength) -> ScheduleSettings:
        unit = length.updates_per_epoch if config.sched_on_updates else 1
        total_t = length.total_updates * unit / length.updates_per_epoch
        kind = config.schedule
        warmup_t = config.warmup_epochs * unit
        if warmup_t > total_t / 2:
            log.warning(
                "warmup_epochs=%g is more than half of this %d-update run: warming up over "
                "the first half instead",
                config.warmup_epochs,
                length.total_updates,
            )
            warmup_t = total_t / 2
        return cls(
            sched=kind,
            lr=scaled_learning_rate(config),
            warmup_lr=config.warmup_lr,
            warmup_t=warmup_t,
            on_updates=config.sched_on_updates,
            updates_per_epoch=length.updates_per_epoch,
            min_lr=config.min_lr if kind == "cosine" else None,
            t_initial=total_t - config.cooldown_epochs * unit if kind == "cosine" else None,
            end_update=length.total_updates if kind == "cosine" else None,
            decay_t=config.decay_epochs * unit if kind == "step" else None,
            decay_milestones=(
                tuple(m * unit for m in config.decay_milestones) if kind == "multistep" else None
            ),
            decay_rate=config.decay_rate if kind in ("step", "multistep") else None,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (checkpoint meta), and equal to a restored one when the settings are."""
        out = dataclasses.asdict(self)
        if out["decay_milestones"] is not None:
            out["decay_milestones"] = list(out["decay_milestones"])
        return out


def scaled_learning_rate(config: ml_collections.ConfigDict) -> float:
    """`learning_rate` is given at `base_batch_size`; scale it linearly to the effective batch."""
    effective_batch = config.batch_size * config.get("grad_accum_steps", 1)
    return config.learning_rate * effective_batch / config.base_batch_size


def create_learning_rate_schedule(s: ScheduleSettings) -> optax.Schedule:
    """LR per optimizer update `count` (0-based): timm's `_get_lr(t)` for that update's t.

    Per epoch, update `count` uses epoch `count // updates_per_epoch`'s LR as timm's
    `scheduler.step(epoch)` does; the update after the last one reads the end value.
    """

    def lr_at(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count).astype(jnp.result_type(float))
        if s.on_updates:
            t = count
        else:
            t = jnp.floor(count / s.updates_per_epoch)
            if s.end_update is not None:
                t = jnp.where(count >= s.end_update, count / s.updates_per_epoch, t)
        if s.sched == "cosine":
            t_i = max(s.t_initial, 1e-12)
            cosine = s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + jnp.cos(math.pi * t / t_i))
            decayed = jnp.where(t < s.t_initial, cosine, s.min_lr)
        elif s.sched == "step":
            decayed = s.lr * s.decay_rate ** jnp.floor(t / s.decay_t)
        elif s.sched == "multistep":
            # timm's convention: milestone m applies from t = m - 1 (bisect_right(ms, t + 1))
            passed = sum((t + 1 >= m).astype(t.dtype) for m in s.decay_milestones)
            decayed = s.lr * s.decay_rate**passed
        else:
            decayed = jnp.full_like(t, s.lr)
        if not s.warmup_t:
            return decayed
        warmup = s.warmup_lr + t * (s.lr - s.warmup_lr) / s.warmup_t
        return jnp.where(t < s.warmup_t, warmup, decayed)

    return lr_at


def path_mask(params: Any, pattern: str) -> Any:
    """True for the leaves whose '/'-joined path fully matches `pattern` (big_vision style)."""
    regex = re.compile(pattern)

    def matches(path, _leaf) -> bool:
        return bool(regex.fullmatch("/".join(str(getattr(k, "key", k)) for k in path)))

    return jax.tree_util.tree_map_with_path(matches, params)


def clip_global_norm(max_norm: float, eps: float) -> optax.GradientTransformation:
    """Scale by max_norm / (norm + eps) where that is below 1: `torch.nn.utils.clip_grad_norm_`
    with eps 1e-6, timm Lamb's `max_grad_norm` with eps 0 (optax's has neither eps)."""

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(max_norm / (optax.global_norm(updates) + eps), 1.0)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def gradient_clipping(config: ml_collections.ConfigDict) -> list[optax.GradientTransformation]:
    """timm train.py's `dispatch_clip_grad(clip_grad, clip_mode)`; AGC leaves the head out, as
    timm's `model_parameters(model, exclude_head=True)` does."""
    if config.clip_grad is None:
        return []
    if config.clip_mode == "norm":
        return [clip_global_norm(config.clip_grad, 1e-6)]
    if config.clip_mode == "value":
        return [optax.clip(config.clip_grad)]
    return [
        optax.masked(
            optax.adaptive_grad_clip(config.clip_grad, eps=1e-3),
            lambda p: path_mask(p, r"(?!classifier/).*"),
        )
    ]


def _base_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule, mask: Any
) -> optax.GradientTransformation:
    opt, wd = config.opt, config.weight_decay
    eps = config.opt_eps if config.opt_eps is not None else DEFAULT_EPS.get(opt)
    b1, b2 = tuple(config.opt_betas) if config.opt_betas is not None else DEFAULT_BETAS
    coupled_decay = optax.add_decayed_weights(wd, mask=mask)
    if opt in ("sgd", "nesterov", "momentum"):
        return optax.chain(
            coupled_decay,
            optax.sgd(schedule, momentum=config.momentum or None, nesterov=opt != "momentum"),
        )
    if opt == "adamw":
        return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask)
    if opt == "lamb":
        # timm's Lamb: grads scaled to global norm <= 1, decoupled decay, and the trust ratio
        # only for the parameters that decay (its groups with weight_decay=0 skip it).
        return optax.chain(
            clip_global_norm(1.0, 0.0),
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.add_decayed_weights(wd, mask=mask),
            optax.masked(optax.scale_by_trust_ratio(), mask if wd else (lambda p: False)),
            optax.scale_by_learning_rate(schedule),
        )
    # rmsproptf: timm's RMSpropTF, square average initialised to ones, eps inside the sqrt,
    # the LR inside the momentum buffer.
    return optax.chain(
        coupled_decay,
        optax.rmsprop(
            schedule,
            decay=0.9,
            eps=eps,
            initial_scale=1.0,
            eps_in_sqrt=True,
            momentum=config.momentum or None,
        ),
    )


def create_optimizer(
    config: ml_collections.ConfigDict, settings: ScheduleSettings
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """timm's `opt` with clipping (`clip_grad`/`clip_mode`) in `optax.MultiSteps` if
    accumulating (timm: loss / accum, step every `grad_accum_steps` batches).

    Returns the transformation and the LR schedule (indexed by optimizer update, for logging).
    """
    schedule = create_learning_rate_schedule(settings)
    tx = optax.chain(
        *gradient_clipping(config),
        _base_optimizer(config, schedule, lambda p: path_mask(p, config.weight_decay_pattern)),
    )
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(  # optax accumulates in float32 unless told
            tx,
            every_k_schedule=config.grad_accum_steps,
            accumulator_dtype=jnp.float64 if config.dtype == "float64" else jnp.float32,
        )
    return tx, schedule
