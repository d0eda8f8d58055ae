"""Data-parallel DPN training: `train_and_evaluate(config, workdir)`.

The per-device steps (`dpn_jax.train.step`, `dpn_jax.infer.evaluate`) run on the runner's mesh
of every device of every process (`jit` over `shard_map`, or `pmap`: `config.parallelism`);
the train state lives there as replicated global arrays and is updated in place. Batches are
fed from a background thread and their pipeline position is checkpointed with the state, so a
run resumes exactly where it stopped. A run resumes from the newest intact checkpoint in
WORKDIR on start and stops cleanly (save, return) on SIGTERM/SIGINT.

A run goes through four phases, one function each: set-up (`_set_up`: data, model, settings,
compiled steps), restore (`_restore`), the loop (`_Loop.run`) and finish (`_finish`: the model
saved, the result said).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from dpn_jax.data import pipeline
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.data.resized import describe_images
from dpn_jax.errors import ConfigError, DataError, OutputError
from dpn_jax.factory import create_model
from dpn_jax.infer.evaluate import compile_eval_step, run_evaluation
from dpn_jax.models.layers import DTYPES
from dpn_jax.runtime.runner import Runner
from dpn_jax.train import report
from dpn_jax.train.checkpoints import Checkpoints
from dpn_jax.train.config import (
    TrainSettings,
    architecture,
    explicit_model_kwargs,
    mixup_active,
    train_settings,
    validate_config,
)
from dpn_jax.train.feed import BatchFeeder, FedBatch
from dpn_jax.train.logger import MetricsLogger
from dpn_jax.train.optim import create_optimizer
from dpn_jax.train.state import TrainState, create_train_state, merge_for_finetuning
from dpn_jax.train.step import compile_train_step, make_train_step
from dpn_jax.train.stop import StopRequest
from dpn_jax.train.workdir import WorkdirLock
from dpn_jax.weights.model_dir import ModelDir
from dpn_jax.weights.pretrained import load_model

log = logging.getLogger(__name__)


def build_model(config: ml_collections.ConfigDict, num_classes: int, axis_name: str | None):
    """The model and its initial variables: fresh, or a model's (`load_model`) with a new head;
    `axis_name` is the runner's (`Runner.axis_name`).

    Returns (model, variables, architecture, model_kwargs, preprocessing): the fine-tuning
    source's or the tag's preprocessing, resolved at the training size with the config's values
    where set.
    """
    (arch, model_kwargs), source = architecture(config), None
    if config.init_from:
        source = load_model(config.init_from)
        arch = source.architecture
        model_kwargs = {**source.model_kwargs, **explicit_model_kwargs(config)}
    model, variables = create_model(
        arch,
        num_classes=num_classes,
        dtype=DTYPES[config.dtype],
        drop_rate=config.drop_rate,
        rng=jax.random.key(config.seed),
        axis_name=axis_name,
        **model_kwargs,
    )
    if source is not None:
        variables = merge_for_finetuning(variables, source.variables, config.init_from)
    if config.dtype == "float64":  # parameters, BatchNorm statistics and so optimizer state
        variables = jax.tree.map(lambda x: np.asarray(x, np.float64), variables)
    base = source.preprocessing if source is not None else Preprocessing.of_model(arch)
    preprocessing = base.resolve(
        config.image_size,
        config.get("crop_pct"),
        interpolation=config.get("interpolation"),
        mean=config.get("mean"),
        std=config.get("std"),
    )
    return model, variables, arch, model_kwargs, preprocessing


@dataclasses.dataclass
class _LogWindow:
    """The steps since the last log line: their metrics (on the device) and input waits."""

    start_step: int
    start_time: float = dataclasses.field(default_factory=time.perf_counter)
    metrics: list[dict] = dataclasses.field(default_factory=list)
    wait_seconds: float = 0.0

    def restart_clock(self, step: int) -> None:
        """Time from here: what came before (compilation, evaluation) is not training."""
        self.start_step, self.start_time, self.wait_seconds = step, time.perf_counter(), 0.0

    def summary(self, step: int, batch_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start_time, 1e-9)
        values = [Runner.value(m) for m in self.metrics]
        mean = lambda key: float(np.mean([v[key] for v in values]))  # noqa: E731
        return {
            "train_loss": mean("loss"),
            "train_top1": mean("top1"),
            "lr": float(values[-1]["lr"]),  # after the window's last update
            "img_per_sec": (step - self.start_step) * batch_size / elapsed,
            "data_wait": min(self.wait_seconds / elapsed, 1.0),
        }


@dataclasses.dataclass(frozen=True)
class TrainHooks:
    """Where a caller reaches into a run without patching modules (tests/train_worker.py
    injects its faults here); the defaults are a real run's."""

    # The training stream, called with `pipeline.train_batches`' arguments.
    train_batches: Callable[..., Any] = pipeline.train_batches
    # The per-device train step (`make_train_step`'s), wrapped before it is compiled.
    wrap_step: Callable[[Callable], Callable] = lambda step: step
    # Called with the state restored from a checkpoint (not with a fresh one).
    after_restore: Callable[[TrainState], None] = lambda state: None
    # Called after each checkpoint save is started, with the checkpoints and the step saved.
    after_save: Callable[[Checkpoints, int], None] = lambda checkpoints, step: None


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    hooks: TrainHooks | None = None,
) -> dict[str, float]:
    """Train `config` in `workdir` (resuming if it holds checkpoints); the last eval metrics.

    Every epoch (and at the end) the full eval split is evaluated, with the EMA weights too when
    `ema_decay` > 0. At the end the weights (EMA if enabled) are saved to WORKDIR/model.
    """
    validate_config(config)
    workdir = Path(workdir).absolute()
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the workdir {workdir}: {error.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):  # e.g. a finished run's, made read-only
        raise OutputError(f"cannot write in the workdir {workdir}: permission denied")
    ModelDir.check_output(workdir / "model", overwrite=True)  # refuses a user's files there
    lock = WorkdirLock(workdir, created=created) if jax.process_index() == 0 else None
    with lock or contextlib.nullcontext():
        return _train(config, workdir, hooks or TrainHooks())


def _train(config: ml_collections.ConfigDict, workdir: Path, hooks: TrainHooks) -> dict[str, float]:
    """The run's phases: set-up, restore, the loop, finish (not when a signal stopped it)."""
    setup = _set_up(config, workdir, hooks)
    with contextlib.ExitStack() as stack:
        checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
        stack.callback(checkpoints.close)  # waits for pending saves
        start = _restore(setup, checkpoints, hooks)
        if start is None:
            return {}
        loop = _Loop(setup, checkpoints, *start, hooks, stack)
        if not loop.run():  # stopped by a signal
            return loop.eval_metrics
        return _finish(setup, loop)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What set-up decided, for the phases after it."""

    config: ml_collections.ConfigDict
    workdir: Path
    runner: Runner
    info: pipeline.DatasetInfo
    settings: TrainSettings
    arch: str
    model_kwargs: dict[str, Any]
    data_cfg: Preprocessing  # resolved at the training size
    host_state: TrainState  # the initial state, on the host
    meta: dict[str, Any]  # saved with each checkpoint
    train_step: Callable
    eval_step: Callable
    batch_size: int  # this process's rows of each batch
    eval_batch_size: int

    @property
    def steps_per_epoch(self) -> int:
        return self.settings.length.steps_per_epoch


def _set_up(config: ml_collections.ConfigDict, workdir: Path, hooks: TrainHooks) -> _Setup:
    """Check the data against the config, then build the model, the settings and the steps."""
    runner = Runner(config.parallelism)
    batch_size = runner.check_batch_size(config.batch_size, "--config.batch_size")
    eval_batch_size = runner.check_batch_size(config.eval_batch_size, "--config.eval_batch_size")
    info, steps_per_epoch = _check_data(config)
    model, variables, arch, model_kwargs, data_cfg = build_model(
        config, info.num_classes, runner.axis_name
    )
    report.say(
        report.describe_run(
            arch=arch,
            model_kwargs=model_kwargs,
            params=variables["params"],
            dataset=config.dataset,
            num_train=info.num_train_examples,
            num_eval=info.num_eval_examples,
            num_classes=info.num_classes,
            devices=runner.devices,
            workdir=workdir,
            prepared=describe_images(info.prepared, config.reduced_decode),
        )
    )
    mean, std = data_cfg.mean, data_cfg.std
    settings = train_settings(config, steps_per_epoch, info.num_classes)
    tx, schedule = create_optimizer(settings.optimizer, settings.schedule)
    use_ema = settings.step.ema_decay > 0
    train_step = make_train_step(model, tx, schedule, settings.step, mean, std)
    return _Setup(
        config=config,
        workdir=workdir,
        runner=runner,
        info=info,
        settings=settings,
        arch=arch,
        model_kwargs=model_kwargs,
        data_cfg=data_cfg,
        host_state=create_train_state(variables, tx, seed=config.seed, use_ema=use_ema),
        meta=_checkpoint_meta(config, info, arch, model_kwargs, settings),
        train_step=compile_train_step(runner, hooks.wrap_step(train_step)),
        eval_step=compile_eval_step(runner, model, mean, std),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
    )


def _check_data(config: ml_collections.ConfigDict) -> tuple[pipeline.DatasetInfo, int]:
    """The dataset's classes and sizes, and the steps per epoch; refuses a dataset or batch the
    run cannot train on before any model is built."""
    info = pipeline.dataset_info(
        config.dataset, data_dir=config.data_dir, eval_split=config.eval_split
    )
    if info.num_classes < 2:
        raise DataError(
            f"dataset {config.dataset} has {info.num_classes} class "
            f"({', '.join(info.class_names)}); training a classifier needs at least 2"
        )
    steps_per_epoch = info.num_train_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"--config.batch_size={config.batch_size} exceeds the "
            f"{info.num_train_examples} training examples of {config.dataset}"
        )
    per_device = config.batch_size // jax.device_count()
    if mixup_active(config) and per_device % 2:
        raise ConfigError(
            f"--config.mixup/cutmix mix each device's rows in pairs: --config.batch_size="
            f"{config.batch_size} gives {per_device} per device; make that even"
        )
    return info, steps_per_epoch


def _checkpoint_meta(
    config: ml_collections.ConfigDict,
    info: pipeline.DatasetInfo,
    arch: str,
    model_kwargs: dict[str, Any],
    settings: TrainSettings,
) -> dict[str, Any]:
    """What each checkpoint records of its run (a resume checks the schedule against it)."""
    return {
        "class_names": list(info.class_names),
        "architecture": arch,
        "model_kwargs": model_kwargs,
        "dataset": config.dataset,
        "seed": config.seed,
        "steps_per_epoch": settings.length.steps_per_epoch,
        "total_steps": settings.length.total_steps,
        "schedule": settings.schedule.as_dict(),
        "config": config.to_dict(),
    }


def _stream_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The pipeline arguments the training and the evaluation batches share."""
    return dict(
        image_size=config.image_size,
        data_dir=config.data_dir,
        num_workers=config.data_workers,
        reduced_decode=config.reduced_decode,
    )


def _train_batches(setup: _Setup, hooks: TrainHooks):
    """This process's training stream (`pipeline.train_batches` unless a hook replaces it)."""
    config = setup.config
    return hooks.train_batches(
        config.dataset,
        batch_size=setup.batch_size,
        interpolation=config.train_interpolation or setup.data_cfg.interpolation,
        seed=config.seed,
        aa=config.aa,
        color_jitter=config.color_jitter,
        color_jitter_prob=config.color_jitter_prob,
        mean=setup.data_cfg.mean,
        no_aug=config.no_aug,
        **_stream_args(config),
    )


def _evaluate(setup: _Setup, state: TrainState) -> dict[str, float]:
    """The full eval split, with the raw weights and the EMA's (metrics suffixed `_ema`)."""

    def batches():
        return pipeline.eval_batches(
            setup.config.dataset,
            batch_size=setup.eval_batch_size,
            crop_pct=setup.data_cfg.crop_pct,
            interpolation=setup.data_cfg.interpolation,
            eval_split=setup.config.eval_split,
            **_stream_args(setup.config),
        )

    metrics = run_evaluation(setup.runner, setup.eval_step, state.variables(), batches()).metrics()
    if state.ema is not None:
        ema = run_evaluation(setup.runner, setup.eval_step, state.variables(ema=True), batches())
        metrics.update(ema.metrics(suffix="_ema"))
    return metrics


def _restore(
    setup: _Setup, checkpoints: Checkpoints, hooks: TrainHooks
) -> tuple[TrainState, dict | None] | None:
    """The state to start from (the newest intact checkpoint's, else the initial one) and the
    pipeline position it reached; None when the workdir holds more steps than the run."""
    restored = checkpoints.restore_latest(setup.runner.abstract_state(setup.host_state))
    if restored:
        hooks.after_restore(restored[0])
    state, data_state = restored if restored else (setup.runner.replicate(setup.host_state), None)
    step, total_steps = int(Runner.value(state.step)), setup.settings.length.total_steps
    if step > total_steps:
        report.say(report.nothing_to_train(step, total_steps, setup.workdir))
        return None
    if restored:
        report.say(report.resuming(step, total_steps, checkpoints.directory / str(step)))
        check_resumed_schedule(checkpoints.meta(step), setup.meta, checkpoints.directory)
    return state, data_state


class _Loop:
    """The training loop and what it drives: the batch feeder, the progress bar, the metrics
    log, evaluations and checkpoints (opened on `stack`, closed with it)."""

    def __init__(
        self,
        setup: _Setup,
        checkpoints: Checkpoints,
        state: TrainState,
        data_state: dict | None,
        hooks: TrainHooks,
        stack: contextlib.ExitStack,
    ):
        self.setup, self.config, self.hooks = setup, setup.config, hooks
        self.checkpoints = checkpoints
        self.state, self.total_steps = state, setup.settings.length.total_steps
        self.start_step = self.step = int(Runner.value(state.step))
        self.logger = MetricsLogger(setup.workdir, resume_step=self.start_step)
        stack.callback(self.logger.close)
        self.stop = stack.enter_context(StopRequest().installed())
        batches = _train_batches(setup, hooks)
        if data_state is not None:
            batches.set_state(data_state)
        self.data_state = batches.get_state()
        self.feeder = stack.enter_context(BatchFeeder(batches, setup.runner))
        # One process may leave a wait for data on a signal; several must stay in step.
        local = jax.process_count() == 1
        self.interruptible = self.stop.requested_locally if local else (lambda: False)
        self.progress = stack.enter_context(
            tqdm.tqdm(
                total=self.total_steps,
                initial=self.start_step,
                disable=jax.process_index() != 0,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                smoothing=0,  # the rate since report.restart_eta: steady, without compilation
            )
        )
        self.eval_metrics: dict[str, float] = {}
        self.window = _LogWindow(self.start_step)

    def run(self) -> bool:
        """Train to the run's end (True) or until a signal stops it (False; the step is saved)."""
        steps_per_epoch = self.setup.steps_per_epoch
        while self.step < self.total_steps:
            fed = self.feeder.next(self.interruptible)
            if fed is None:  # a signal while waiting for data
                return self._stopped(waiting=True)
            self.state, metrics = self.setup.train_step(self.state, fed.batch)
            self._record(fed, metrics)
            last = self.step == self.total_steps
            epoch_end = last or self.step % steps_per_epoch == 0
            if epoch_end or self.step % self.config.log_every_steps == 0:
                self._log()
            if epoch_end:
                self._evaluate()
            stopping = self.stop.should_stop(self.step)
            if stopping or last or self.step % self.config.checkpoint_every_steps == 0:
                self._save()
            if stopping:
                return self._stopped(waiting=False)
        return True

    def _record(self, fed: FedBatch, metrics: dict) -> None:
        """Count the step just made, in the progress bar and the log window."""
        self.data_state = fed.data_state
        self.step += 1
        self.window.metrics.append(metrics)
        self.window.wait_seconds += fed.wait_seconds
        if self.step == self.start_step + 1:  # keep compilation out of img/s, data_wait and ETA
            jax.block_until_ready(self.state)
            self.window.restart_clock(self.step)
            report.restart_eta(self.progress, self.step)
        self.progress.update(1)

    def _log(self) -> None:
        _check_finite(self.state, self.setup)
        train = self.window.summary(self.step, self.config.batch_size)
        self.logger.write(self.step, train, epoch=self.step / self.setup.steps_per_epoch)
        self.progress.set_postfix(
            loss=f"{train['train_loss']:.4f}",
            top1=f"{train['train_top1']:.3f}",
            img_s=f"{train['img_per_sec']:.0f}",
            wait=f"{100 * train['data_wait']:.0f}%",
            lr=f"{train['lr']:.4g}",
        )
        self.window = _LogWindow(self.step)

    def _evaluate(self) -> None:
        self.eval_metrics = _evaluate(self.setup, self.state)
        epoch = int(np.ceil(self.step / self.setup.steps_per_epoch))
        self.logger.write(self.step, self.eval_metrics, epoch=epoch)
        self.progress.write(
            f"epoch {epoch} (step {self.step}): "
            + ", ".join(f"{k} {v:.4g}" for k, v in self.eval_metrics.items())
        )
        self.window.restart_clock(self.step)  # keep evaluation out of img/s and data_wait

    def _save(self, *, checked: bool = True) -> None:
        if checked:
            _check_finite(self.state, self.setup)
        self.checkpoints.save(self.state, self.data_state, self.setup.meta)
        self.hooks.after_save(self.checkpoints, self.step)

    def _stopped(self, *, waiting: bool) -> bool:
        """Say where a signal stopped the run; waiting for data, save what the last step made
        (a stop between steps was saved by the loop)."""
        if waiting and self.step > self.start_step:
            self._save(checked=False)
        report.say(
            report.stopped(
                self.stop.signum,
                self.step,
                self.total_steps,
                self.checkpoints.directory,
                waiting=waiting,
            ),
            every_process=True,
        )
        return False


def _check_finite(state: TrainState, setup: _Setup) -> None:
    """FloatingPointError at the first non-finite step, unless the config skips those."""
    bad = int(Runner.value(state.nonfinite_step))
    if bad >= 0 and not setup.config.skip_nonfinite_updates:
        raise FloatingPointError(
            f"loss or gradient became NaN/Inf at step {bad} (epoch "
            f"{(bad - 1) // setup.steps_per_epoch + 1}); that update was not applied. Lower the "
            "learning rate, or set --config.skip_nonfinite_updates=True to skip such steps"
        )


def _finish(setup: _Setup, loop: _Loop) -> dict[str, float]:
    """The end of a run (also of a finished one started again): the model saved, the curves
    plotted and the result said; the last eval metrics."""
    state = loop.state
    save_trained_model(
        setup.workdir / "model",
        state.variables(ema=state.ema is not None),
        arch=setup.arch,
        model_kwargs=setup.model_kwargs,
        num_classes=setup.info.num_classes,
        data_cfg=setup.data_cfg,
        class_names=setup.info.class_names,
        workdir=setup.workdir,
    )
    loop.logger.plot_curves()
    eval_metrics = loop.eval_metrics or report.last_evaluation(loop.logger.jsonl_path)
    loop.progress.close()  # the result is the terminal's last line, not the bar
    for line in report.finished(eval_metrics, setup.workdir / "model"):
        report.say(line)
    return eval_metrics


def check_resumed_schedule(saved: dict, meta: dict, directory: Path) -> None:
    """A resumed run keeps its LR schedule: another one is refused; a new run length that
    leaves the schedule as it was (step, multistep, constant) is honoured, said in one line."""
    if "schedule" not in saved:
        return  # written before the schedule was recorded
    now = meta["schedule"]
    changed = [key for key in now if saved["schedule"].get(key) != now[key]]
    if changed:
        key = changed[0]
        raise ConfigError(
            f"{directory} holds a run with another LR schedule ({key}: "
            f"{saved['schedule'].get(key)!r} there, {now[key]!r} now; run length "
            f"{saved.get('total_steps')} steps there, {meta['total_steps']} now): resume with "
            "the same num_epochs/num_train_steps and schedule keys, or use another --workdir"
        )
    if saved.get("total_steps") != meta["total_steps"]:
        log.warning(
            "run length changed from %s to %d steps on resume; the %s LR schedule does not "
            "depend on it",
            saved.get("total_steps"),
            meta["total_steps"],
            now["sched"],
        )


def save_trained_model(
    path: Path,
    variables: dict,
    *,
    arch: str,
    model_kwargs: dict,
    num_classes: int,
    data_cfg: Preprocessing,
    class_names,
    workdir: Path,
) -> None:
    """The trained weights as a model directory `dpn-predict --checkpoint` and `create_model` read.

    Process 0 writes it from its own copy of the replicated variables; the others wait, so none
    exits while it is being written.
    """
    if jax.process_index() == 0:
        ModelDir(
            architecture=arch,
            num_classes=num_classes,
            model_kwargs=model_kwargs,
            preprocessing=data_cfg,
            variables=Runner.value(variables),
            class_names=tuple(class_names),
            source=f"dpn_jax train.py, workdir {workdir}",
        ).save(path, overwrite=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dpn_jax save_trained_model")
