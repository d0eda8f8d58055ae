"""The training config's rules, checked before any data is read or anything compiles.

`configs/default.py` defines every key (and says what each means in a comment, which
`train.py --help` shows); this module says which values each accepts. A bad value is a
ConfigError naming the key, the value and what is allowed; an unknown key is named with the
closest known one. `train_settings` turns a valid config into the typed settings of the step,
the optimizer, the LR schedule and the run length, once: below the trainer's set-up nothing
reads the config for them.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dpn_jax.data.auto_augment import auto_augment
from dpn_jax.data.batch_augment import ERASING_MODES, MIXUP_MODES, Mixup, RandomErasing
from dpn_jax.data.preprocessing import MAX_INPUT_SIZE, MIN_CROP_PCT, MIN_STD, PIL_INTERPOLATION
from dpn_jax.errors import (
    QUOTE_LIMIT,
    ConfigError,
    is_int,
    is_number,
    is_positive_int,
    printable,
)
from dpn_jax.models.dpn import CONFIG_FIELDS, MODEL_CONFIGS, DPNConfig
from dpn_jax.models.layers import DTYPES
from dpn_jax.runtime.runner import PARALLELISMS
from dpn_jax.train.optim import (
    CLIP_MODES,
    OPTIMIZERS,
    SCHEDULES,
    OptimizerSettings,
    RunLength,
    ScheduleSettings,
)
from dpn_jax.train.step import StepSettings

log = logging.getLogger(__name__)

# `config.model = "demo"`: dpn68 shrunk to train on CPU in minutes (the README's demo). Its
# shrinkage belongs to this name: `--config.model=dpn92` trains timm's dpn92.
DEMO = "demo"
DEMO_ARCHITECTURE = "dpn68"
DEMO_MODEL_KWARGS = dict(
    k_sec=(1, 1, 1, 1), k_r=32, groups=4, num_init_features=16, inc_sec=(8, 8, 8, 8)
)
MAX_EPOCHS = 1e6  # beyond any real run; larger values overflow the step count


def _choice(*allowed: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value in allowed), "one of " + ", ".join(map(repr, allowed))


def _interval(
    low: float, high: float, *, low_open: bool = False, high_open: bool = True
) -> tuple[Callable[[Any], bool], str]:
    def check(value: Any) -> bool:
        return (
            is_number(value)
            and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high)
        )

    return (
        check,
        f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}",
    )


def _optional(rule: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    check, allowed = rule
    return (lambda value: value is None or check(value)), f"unset or {allowed}"


def _triple_of(check: Callable[[Any], bool], what: str) -> tuple[Callable[[Any], bool], str]:
    return (
        lambda value: value is not None and len(value) == 3 and all(map(check, value))
    ), f"three {what}"


def _valid_regex(value: Any) -> bool:
    try:
        re.compile(value)
    except (re.error, TypeError):
        return False
    return True


def _valid_aa(value: Any) -> bool:
    try:
        auto_augment(value, mean=(0.5, 0.5, 0.5))
    except (ConfigError, AttributeError):
        return False
    return True


POSITIVE_INT = (is_positive_int, "a positive integer")
NON_NEGATIVE = _interval(0, float("inf"))
EPOCHS = _interval(0, MAX_EPOCHS)
POSITIVE = _interval(0, float("inf"), low_open=True)
FRACTION = _interval(0, 1)  # [0, 1)
BOOL = ((lambda value: isinstance(value, bool)), "True or False")

RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dtype": _choice(*DTYPES),
    "drop_rate": FRACTION,
    "dataset": ((lambda value: isinstance(value, str) and bool(value)), "a dataset spec"),
    "image_size": (
        (lambda value: is_int(value) and 32 <= value <= MAX_INPUT_SIZE),
        f"an integer in [32, {MAX_INPUT_SIZE}]",
    ),
    "mean": _optional(_triple_of(is_number, "numbers")),
    "std": _optional(_triple_of(lambda v: is_number(v) and v >= MIN_STD, f"numbers >= {MIN_STD}")),
    "crop_pct": _optional(_interval(MIN_CROP_PCT, 1, high_open=False)),
    "interpolation": _optional(_choice(*PIL_INTERPOLATION)),
    "data_workers": ((lambda value: is_int(value) and value >= 0), "an integer >= 0"),
    "reduced_decode": BOOL,
    "aa": _optional(
        (_valid_aa, "timm's rand-m9-mstd0.5-inc1, augmix-m5-w4-d2 or original, v0, ...")
    ),
    "color_jitter": NON_NEGATIVE,
    "color_jitter_prob": _optional(_interval(0, 1, high_open=False)),
    "train_interpolation": _optional(_choice("random", *PIL_INTERPOLATION)),
    "reprob": _interval(0, 1, high_open=False),
    "remode": _choice(*ERASING_MODES),
    "recount": POSITIVE_INT,
    "no_aug": BOOL,
    "mixup": NON_NEGATIVE,
    "cutmix": NON_NEGATIVE,
    "cutmix_minmax": _optional(
        (
            (lambda value: len(value) == 2 and 0 <= value[0] < value[1] <= 1),
            "two fractions min < max",
        )
    ),
    "mixup_prob": _interval(0, 1, high_open=False),
    "mixup_switch_prob": _interval(0, 1, high_open=False),
    "mixup_mode": _choice(*MIXUP_MODES),
    "num_epochs": EPOCHS,
    "num_train_steps": ((lambda value: is_int(value)), "an integer (<= 0: use num_epochs)"),
    "batch_size": POSITIVE_INT,
    "eval_batch_size": POSITIVE_INT,
    "grad_accum_steps": POSITIVE_INT,
    "learning_rate": POSITIVE,
    "base_batch_size": POSITIVE_INT,
    "schedule": _choice(*SCHEDULES),
    "sched_on_updates": BOOL,
    "warmup_epochs": EPOCHS,
    "warmup_lr": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE,
    "cooldown_epochs": EPOCHS,
    "decay_epochs": POSITIVE,
    "decay_milestones": (
        (lambda value: value is not None and all(is_number(v) and v >= 0 for v in value)),
        "a list of epochs >= 0",
    ),
    "decay_rate": POSITIVE,
    "opt": _choice(*OPTIMIZERS),
    "opt_eps": _optional(POSITIVE),
    "opt_betas": _optional(
        ((lambda value: len(value) == 2 and all(map(FRACTION[0], value))), "two numbers in [0, 1)")
    ),
    "momentum": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "weight_decay_pattern": (_valid_regex, "a regular expression"),
    "clip_grad": _optional(POSITIVE),
    "clip_mode": _choice(*CLIP_MODES),
    "smoothing": FRACTION,
    "bce_loss": BOOL,
    "bce_target_thresh": _optional(FRACTION),
    "ema_decay": FRACTION,
    "ema_warmup": BOOL,
    "skip_nonfinite_updates": BOOL,
    "parallelism": _choice(*PARALLELISMS),
    "deterministic": BOOL,
    "seed": ((lambda value: is_int(value) and 0 <= value < 2**31), "an integer in [0, 2**31)"),
    "log_every_steps": POSITIVE_INT,
    "checkpoint_every_steps": POSITIVE_INT,
    "keep_checkpoints": POSITIVE_INT,
}


def explicit_model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The architecture fields the config sets (unset ones are None)."""
    return {key: value for key, value in config.model_kwargs.items() if value is not None}


def architecture(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
    """(timm architecture, model_kwargs) that `config` trains: the demo's shrunk dpn68 for
    `model="demo"`, else the named architecture; set model_kwargs override either."""
    if config.model == DEMO:
        return DEMO_ARCHITECTURE, {**DEMO_MODEL_KWARGS, **explicit_model_kwargs(config)}
    return config.model, explicit_model_kwargs(config)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for the first value a rule refuses, or for a run of no steps."""
    if config.model not in MODEL_CONFIGS and config.model != DEMO:
        raise ConfigError(
            f"--config.model={config.model!r}: must be {DEMO!r} or one of "
            f"{', '.join(MODEL_CONFIGS)}"
        )
    unknown = sorted(set(config.model_kwargs) - set(CONFIG_FIELDS))
    if unknown:
        raise ConfigError(
            f"--config.model_kwargs.{unknown[0]}: not an architecture field; "
            f"choose from {', '.join(CONFIG_FIELDS)}"
        )
    arch, model_kwargs = architecture(config)
    try:
        MODEL_CONFIGS[arch].replace(**model_kwargs)
    except ConfigError as error:
        raise ConfigError(f"--config.model_kwargs: {error}") from None
    for key, (check, allowed) in RULES.items():
        value = config.get(key)
        if not check(value):
            raise ConfigError(f"--config.{key}={value!r}: must be {allowed}")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError(
            "nothing to train: set --config.num_epochs > 0 or --config.num_train_steps > 0"
        )
    if config.opt in ("sgd", "nesterov") and not config.momentum:
        raise ConfigError(f"--config.opt={config.opt} (Nesterov) needs --config.momentum > 0")
    if config.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise ConfigError("--config.dtype=float64 needs JAX_ENABLE_X64=1 in the environment")
    if config.init_from == "":
        raise ConfigError(
            "this config fine-tunes: set --config.init_from=DIR (a model directory "
            "written by dpn-convert or by train.py)"
        )


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything the step and the optimizer read of a run's config, decided once."""

    length: RunLength
    schedule: ScheduleSettings
    optimizer: OptimizerSettings
    step: StepSettings


def train_settings(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_classes: int
) -> TrainSettings:
    """A validated config's settings for a training split of `steps_per_epoch` batches."""
    length = run_length(config, steps_per_epoch)
    return TrainSettings(
        length=length,
        schedule=schedule_settings(config, length),
        optimizer=optimizer_settings(config),
        step=step_settings(config, num_classes),
    )


def run_length(config: ml_collections.ConfigDict, steps_per_epoch: int) -> RunLength:
    """`num_train_steps` batches if > 0, else `num_epochs` + `cooldown_epochs` epochs."""
    if config.num_train_steps > 0:
        total = config.num_train_steps
    else:
        epochs = config.num_epochs + config.cooldown_epochs
        total = max(1, int(epochs * steps_per_epoch))
    return RunLength(steps_per_epoch, total, config.grad_accum_steps)


def scaled_learning_rate(config: ml_collections.ConfigDict) -> float:
    """`learning_rate` is given at `base_batch_size`; scale it linearly to the effective batch."""
    effective_batch = config.batch_size * config.get("grad_accum_steps", 1)
    return config.learning_rate * effective_batch / config.base_batch_size


def schedule_settings(config: ml_collections.ConfigDict, length: RunLength) -> ScheduleSettings:
    """timm's scheduler arguments in the schedule's unit. A warm-up longer than half the run (a
    short test of a recipe) is cut to half, so the run still ends at the schedule's end value."""
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
    return ScheduleSettings(
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


def optimizer_settings(config: ml_collections.ConfigDict) -> OptimizerSettings:
    return OptimizerSettings(
        opt=config.opt,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        weight_decay_pattern=config.weight_decay_pattern,
        opt_eps=config.opt_eps,
        opt_betas=config.opt_betas,
        clip_grad=config.clip_grad,
        clip_mode=config.clip_mode,
        grad_accum_steps=config.grad_accum_steps,
        accumulator_dtype=jnp.float64 if config.dtype == "float64" else jnp.float32,
    )


def mixup_active(config: ml_collections.ConfigDict) -> bool:
    """timm train.py's `mixup_active`."""
    return config.mixup > 0 or config.cutmix > 0 or config.cutmix_minmax is not None


def step_settings(config: ml_collections.ConfigDict, num_classes: int) -> StepSettings:
    """The step's loss, EMA and accumulation, and timm's device-side train augmentations as
    train.py configures them."""
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
    return StepSettings(
        smoothing=config.smoothing,
        bce_loss=config.bce_loss,
        bce_target_thresh=config.bce_target_thresh,
        grad_accum_steps=config.grad_accum_steps,
        ema_decay=config.ema_decay,
        ema_warmup=config.ema_warmup,
        erasing=erasing,
        mixup=mixup,
    )


def unknown_key_message(config: ml_collections.ConfigDict, path: str) -> str | None:
    """'--config.PATH: no such key (did you mean --config.KEY?)' when `path` (dotted, as after
    `--config.`) names no key of `config`; None when it does."""
    node: Any = config
    parts = path.split(".")
    for depth, part in enumerate(parts):
        keyed = isinstance(node, (Mapping, ml_collections.ConfigDict))
        if keyed and part in node:
            node = node[part]
            continue
        if not keyed:
            return f"--config.{printable(path, QUOTE_LIMIT)}: {'.'.join(parts[:depth])} has no keys"
        known = CONFIG_FIELDS if parts[:depth] == ["model_kwargs"] else list(node)
        close = difflib.get_close_matches(part, known, n=1)
        prefix = "".join(f"{p}." for p in parts[:depth])
        hint = (
            f" (did you mean --config.{prefix}{close[0]}?)"
            if close
            else " (train.py --help lists the keys)"
        )
        return f"--config.{printable(path, QUOTE_LIMIT)}: no such key{hint}"
    return None


def key_meanings(source: str) -> dict[str, str]:
    """KEY -> the comment that ends its `config.KEY = ...` line in a config file's source."""
    pattern = re.compile(r"^\s*config\.(\w+)\s*=.*?#\s*(.+)$")
    return {m[1]: m[2].strip() for m in map(pattern.match, source.splitlines()) if m}


def describe_keys(
    config: ml_collections.ConfigDict, meanings: Mapping[str, str], prefix: str = ""
) -> list[str]:
    """One line per key, nested ones dotted: `--config.KEY=DEFAULT  meaning`."""
    settings = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            settings += describe_keys(value, meanings, f"{prefix}{key}.")
        else:
            meaning = meanings.get(f"{prefix}{key}", "")
            settings.append(f"--config.{prefix}{key}={value!r}  {meaning}".rstrip())
    return settings


def architecture_meanings() -> dict[str, str]:
    """`model_kwargs.FIELD` -> the comment of DPNConfig's field (what it changes)."""
    pattern = re.compile(r"^\s*(\w+): [^=]+= .*?#\s*(.+)$")
    matches = map(pattern.match, inspect.getsource(DPNConfig).splitlines())
    return {f"model_kwargs.{m[1]}": m[2].strip() for m in matches if m}
