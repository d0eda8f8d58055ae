"""timm's optimizers, gradient clipping and LR schedulers, with timm's names and semantics.

The run length is decided once (`RunLength`) and everything reads it: the loop, the progress bar
and the LR schedule (`ScheduleSettings`, timm's `create_scheduler_v2` arguments in optimizer
updates). These settings and `OptimizerSettings` are built once from the training config
(`dpn_jax.train.config.train_settings`); nothing here reads the config itself.

Weight decay applies only to parameters whose path matches `weight_decay_pattern` (conv and dense
kernels: timm's `param_groups_weight_decay` leaves out BatchNorm and biases); it is coupled L2
for SGD and RMSpropTF and decoupled for AdamW and LAMB, as the torch/timm optimizers do.
`tests/test_torch_parity.py` runs the same steps in PyTorch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

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
    timm's `cooldown_epochs`) of the training split (`dpn_jax.train.config.run_length`)."""

    steps_per_epoch: int
    total_steps: int
    grad_accum_steps: int

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer updates per epoch, rounded up as timm's train.py does."""
        return -(-self.steps_per_epoch // self.grad_accum_steps)

    @property
    def total_updates(self) -> int:
        return self.total_steps // self.grad_accum_steps


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
    """timm's scheduler (`create_scheduler_v2`, warmup not prefixed) for one run
    (`dpn_jax.train.config.schedule_settings`).

    Times are in the schedule's unit: optimizer updates (timm's `sched_on_updates`) or whole
    epochs. Fields a schedule kind does not read are None, so two settings are equal exactly
    when they give the same LR at every update (what a resumed run must keep).
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

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (checkpoint meta), and equal to a restored one when the settings are."""
        out = dataclasses.asdict(self)
        if out["decay_milestones"] is not None:
            out["decay_milestones"] = list(out["decay_milestones"])
        return out


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """timm's optimizer and gradient clipping, with train.py's argument names, for one run
    (`dpn_jax.train.config.optimizer_settings`)."""

    opt: str
    momentum: float
    weight_decay: float
    weight_decay_pattern: str  # the decayed parameters' '/'-joined paths (`path_mask`)
    opt_eps: float | None = None  # None: the optimizer's default (DEFAULT_EPS)
    opt_betas: tuple[float, float] | None = None  # None: DEFAULT_BETAS
    clip_grad: float | None = None
    clip_mode: str = "norm"
    grad_accum_steps: int = 1
    accumulator_dtype: Any = jnp.float32  # of the gradients summed over grad_accum_steps


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
        scale = jnp.minimum(max_norm / (optax.tree.norm(updates) + eps), 1.0)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def gradient_clipping(s: OptimizerSettings) -> list[optax.GradientTransformation]:
    """timm train.py's `dispatch_clip_grad(clip_grad, clip_mode)`; AGC leaves the head out, as
    timm's `model_parameters(model, exclude_head=True)` does."""
    if s.clip_grad is None:
        return []
    if s.clip_mode == "norm":
        return [clip_global_norm(s.clip_grad, 1e-6)]
    if s.clip_mode == "value":
        return [optax.clip(s.clip_grad)]
    return [
        optax.masked(
            optax.adaptive_grad_clip(s.clip_grad, eps=1e-3),
            lambda p: path_mask(p, r"(?!classifier/).*"),
        )
    ]


def _base_optimizer(
    s: OptimizerSettings, schedule: optax.Schedule, mask: Any
) -> optax.GradientTransformation:
    opt, wd = s.opt, s.weight_decay
    eps = s.opt_eps if s.opt_eps is not None else DEFAULT_EPS.get(opt)
    b1, b2 = tuple(s.opt_betas) if s.opt_betas is not None else DEFAULT_BETAS
    coupled_decay = optax.add_decayed_weights(wd, mask=mask)
    if opt in ("sgd", "nesterov", "momentum"):
        return optax.chain(
            coupled_decay,
            optax.sgd(schedule, momentum=s.momentum or None, nesterov=opt != "momentum"),
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
            momentum=s.momentum or None,
        ),
    )


def create_optimizer(
    settings: OptimizerSettings, schedule_settings: ScheduleSettings
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """timm's `opt` with clipping (`clip_grad`/`clip_mode`) in `optax.MultiSteps` if
    accumulating (timm: loss / accum, step every `grad_accum_steps` batches).

    Returns the transformation and the LR schedule (indexed by optimizer update, for logging).
    """
    schedule = create_learning_rate_schedule(schedule_settings)
    tx = optax.chain(
        *gradient_clipping(settings),
        _base_optimizer(settings, schedule, lambda p: path_mask(p, settings.weight_decay_pattern)),
    )
    if settings.grad_accum_steps > 1:
        tx = optax.MultiSteps(  # optax accumulates in float32 unless told
            tx,
            every_k_schedule=settings.grad_accum_steps,
            accumulator_dtype=settings.accumulator_dtype,
        )
    return tx, schedule
