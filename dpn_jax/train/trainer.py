"""Data-parallel DPN training: `train_and_evaluate(config, workdir)`.

The per-device steps (`dpn_jax.train.step`, `dpn_jax.infer.evaluate`) run on the runner's mesh
of every device of every process (`jit` over `shard_map`, or `pmap`: `config.parallelism`);
the train state lives there as replicated global arrays and is updated in place. Batches are
fed from a background thread and their pipeline position is checkpointed with the state, so a
run resumes exactly where it stopped. A run resumes from the newest intact checkpoint in
WORKDIR on start and stops cleanly (save, return) on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from dpn_jax.data import pipeline
from dpn_jax.errors import ConfigError, DataError, OutputError
from dpn_jax.factory import create_model
from dpn_jax.infer.evaluate import compile_eval_step, run_evaluation
from dpn_jax.models.registry import pretrained_cfg
from dpn_jax.runtime.runner import AXIS, Runner
from dpn_jax.train import report
from dpn_jax.train.checkpoints import Checkpoints
from dpn_jax.train.config import (
    architecture,
    explicit_model_kwargs,
    mixup_active,
    train_settings,
    validate_config,
)
from dpn_jax.train.feed import BatchFeeder
from dpn_jax.train.logger import MetricsLogger
from dpn_jax.train.optim import create_optimizer
from dpn_jax.train.state import TrainState, create_train_state, merge_for_finetuning
from dpn_jax.train.step import compile_train_step, make_train_step
from dpn_jax.train.stop import StopRequest
from dpn_jax.train.workdir import WorkdirLock
from dpn_jax.weights.model_dir import ModelDir, Preprocessing

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def data_config(
    config: ml_collections.ConfigDict, model_name: str, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Preprocessing: config values where set, else the fine-tuning source's, else the tag's."""
    cfg = dict(base or pretrained_cfg(model_name))
    for key in ("mean", "std", "crop_pct", "interpolation"):
        if config.get(key) is not None:
            cfg[key] = config[key]
    size = config.image_size
    return dict(
        cfg,
        input_size=(size, size),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        test_input_size=None,
        test_crop_pct=None,
    )


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The model and its initial variables: fresh, or a model directory's with a new head.

    Returns (model, variables, architecture, model_kwargs, preprocessing base cfg or None).
    """
    (arch, model_kwargs), base_cfg, loaded = architecture(config), None, None
    if config.init_from:
        source = ModelDir.load(config.init_from)
        arch, loaded = source.architecture, source.variables
        model_kwargs = {**source.model_kwargs, **explicit_model_kwargs(config)}
        base_cfg = source.preprocessing.as_dict()
    model, variables = create_model(
        arch,
        num_classes=num_classes,
        dtype=DTYPES[config.dtype],
        drop_rate=config.drop_rate,
        rng=jax.random.key(config.seed),
        axis_name=AXIS,
        **model_kwargs,
    )
    if loaded is not None:
        variables = merge_for_finetuning(variables, loaded, config.init_from)
    if config.dtype == "float64":  # parameters, BatchNorm statistics and so optimizer state
        variables = jax.tree.map(lambda x: np.asarray(x, np.float64), variables)
    return model, variables, arch, model_kwargs, base_cfg


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


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, float]:
    """Train `config` in `workdir` (resuming if it holds checkpoints); the last eval metrics.

    Every epoch (and at the end) the full eval split is evaluated, with the EMA weights too when
    `ema_decay` > 0. At the end the weights (EMA if enabled) are exported to WORKDIR/model.
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
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, float]:
    runner = Runner(config.parallelism)
    batch_size = runner.check_batch_size(config.batch_size, "--config.batch_size")
    eval_batch_size = runner.check_batch_size(config.eval_batch_size, "--config.eval_batch_size")
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
    model, variables, arch, model_kwargs, base_cfg = build_model(config, info.num_classes)
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
        )
    )
    data_cfg = data_config(config, arch, base_cfg)
    settings = train_settings(config, steps_per_epoch, info.num_classes)
    total_steps = settings.length.total_steps
    tx, schedule = create_optimizer(settings.optimizer, settings.schedule)
    host_state = create_train_state(
        variables, tx, seed=config.seed, use_ema=settings.step.ema_decay > 0
    )
    meta = {
        "class_names": list(info.class_names),
        "architecture": arch,
        "model_kwargs": model_kwargs,
        "dataset": config.dataset,
        "seed": config.seed,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "schedule": settings.schedule.as_dict(),
        "config": config.to_dict(),
    }

    train_step = compile_train_step(
        runner,
        make_train_step(model, tx, schedule, settings.step, data_cfg["mean"], data_cfg["std"]),
    )
    eval_step = compile_eval_step(runner, model, data_cfg["mean"], data_cfg["std"])

    def evaluate(state: TrainState) -> dict[str, float]:
        def batches():
            return pipeline.eval_batches(
                config.dataset,
                batch_size=eval_batch_size,
                image_size=config.image_size,
                crop_pct=data_cfg["crop_pct"],
                interpolation=data_cfg["interpolation"],
                data_dir=config.data_dir,
                eval_split=config.eval_split,
                num_workers=config.data_workers,
            )

        metrics = run_evaluation(runner, eval_step, state.variables(), batches()).metrics()
        if state.ema is not None:
            ema = run_evaluation(runner, eval_step, state.variables(ema=True), batches())
            metrics.update(ema.metrics(suffix="_ema"))
        return metrics

    def check_finite(state: TrainState) -> None:
        bad = int(Runner.value(state.nonfinite_step))
        if bad >= 0 and not config.skip_nonfinite_updates:
            raise FloatingPointError(
                f"loss or gradient became NaN/Inf at step {bad} (epoch "
                f"{(bad - 1) // steps_per_epoch + 1}); that update was not applied. Lower the "
                "learning rate, or set --config.skip_nonfinite_updates=True to skip such steps"
            )

    with contextlib.ExitStack() as stack:
        checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
        stack.callback(checkpoints.close)  # waits for pending saves
        restored = checkpoints.restore_latest(runner.abstract_state(host_state))
        state, data_state = restored if restored else (runner.replicate(host_state), None)
        start_step = step = int(Runner.value(state.step))
        if step > total_steps:
            report.say(report.nothing_to_train(step, total_steps, workdir))
            return {}
        if restored:
            report.say(report.resuming(step, total_steps, checkpoints.directory / str(step)))
            check_resumed_schedule(checkpoints.meta(step), meta, checkpoints.directory)
        logger = MetricsLogger(workdir, resume_step=start_step)
        stack.callback(logger.close)
        stop = stack.enter_context(StopRequest().installed())
        train_batches = pipeline.train_batches(
            config.dataset,
            batch_size=batch_size,
            image_size=config.image_size,
            interpolation=config.train_interpolation or data_cfg["interpolation"],
            seed=config.seed,
            data_dir=config.data_dir,
            num_workers=config.data_workers,
            aa=config.aa,
            color_jitter=config.color_jitter,
            color_jitter_prob=config.color_jitter_prob,
            mean=data_cfg["mean"],
            no_aug=config.no_aug,
        )
        if data_state is not None:
            train_batches.set_state(data_state)
        data_state = train_batches.get_state()
        feeder = stack.enter_context(BatchFeeder(train_batches, runner))
        # One process may leave a wait for data on a signal; several must stay in step.
        interruptible = stop.requested_locally if jax.process_count() == 1 else (lambda: False)
        progress = stack.enter_context(
            tqdm.tqdm(
                total=total_steps,
                initial=start_step,
                disable=jax.process_index() != 0,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                smoothing=0,  # the rate since report.restart_eta: steady, without compilation
            )
        )
        eval_metrics: dict[str, float] = {}
        window = _LogWindow(start_step)

        while step < total_steps:
            fed = feeder.next(interruptible)
            if fed is None:  # a signal while waiting for data: save what the last step made
                if step > start_step:
                    checkpoints.save(state, data_state, meta)
                report.say(
                    report.stopped(
                        stop.signum, step, total_steps, checkpoints.directory, waiting=True
                    ),
                    every_process=True,
                )
                return eval_metrics
            state, metrics = train_step(state, fed.batch)
            data_state = fed.data_state
            step += 1
            window.metrics.append(metrics)
            window.wait_seconds += fed.wait_seconds
            if step == start_step + 1:  # keep compilation out of img/s, data_wait and the ETA
                jax.block_until_ready(state)
                window.restart_clock(step)
                report.restart_eta(progress, step)
            progress.update(1)
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if window.metrics and (step % config.log_every_steps == 0 or epoch_end):
                check_finite(state)
                train = window.summary(step, config.batch_size)
                logger.write(step, train, epoch=step / steps_per_epoch)
                progress.set_postfix(
                    loss=f"{train['train_loss']:.4f}",
                    top1=f"{train['train_top1']:.3f}",
                    img_s=f"{train['img_per_sec']:.0f}",
                    wait=f"{100 * train['data_wait']:.0f}%",
                    lr=f"{train['lr']:.4g}",
                )
                window = _LogWindow(step)
            if epoch_end:
                eval_metrics = evaluate(state)
                epoch = int(np.ceil(step / steps_per_epoch))
                logger.write(step, eval_metrics, epoch=epoch)
                progress.write(
                    f"epoch {epoch} (step {step}): "
                    + ", ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items())
                )
                window.restart_clock(step)  # keep evaluation out of img/s and data_wait
            stopping = stop.should_stop(step)
            if step % config.checkpoint_every_steps == 0 or step == total_steps or stopping:
                check_finite(state)
                checkpoints.save(state, data_state, meta)
            if stopping:
                report.say(
                    report.stopped(stop.signum, step, total_steps, checkpoints.directory),
                    every_process=True,
                )
                return eval_metrics

        if step == total_steps:  # (also when resuming a finished run: re-export)
            export_model(
                workdir / "model",
                state.variables(ema=state.ema is not None),
                arch=arch,
                model_kwargs=model_kwargs,
                num_classes=info.num_classes,
                data_cfg=data_cfg,
                class_names=info.class_names,
                workdir=workdir,
            )
            logger.plot_curves()
            eval_metrics = eval_metrics or report.last_evaluation(logger.jsonl_path)
            for line in report.finished(eval_metrics, workdir / "model"):
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


def export_model(
    path: Path,
    variables: dict,
    *,
    arch: str,
    model_kwargs: dict,
    num_classes: int,
    data_cfg: dict,
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
            preprocessing=Preprocessing.from_cfg(data_cfg),
            variables=Runner.value(variables),
            class_names=tuple(class_names),
            source=f"dpn_jax train.py, workdir {workdir}",
        ).save(path, overwrite=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dpn_jax export_model")
