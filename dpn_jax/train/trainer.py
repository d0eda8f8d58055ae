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
from dpn_jax.train.checkpoints import Checkpoints
from dpn_jax.train.config import validate_config
from dpn_jax.train.feed import BatchFeeder
from dpn_jax.train.logger import MetricsLogger
from dpn_jax.train.optim import create_optimizer
from dpn_jax.train.state import TrainState, create_train_state, merge_for_finetuning
from dpn_jax.train.step import compile_train_step
from dpn_jax.train.stop import StopRequest
from dpn_jax.train.workdir import WorkdirLock
from dpn_jax.weights.model_dir import ModelDir, Preprocessing

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
    arch, model_kwargs, base_cfg, loaded = config.model, dict(config.model_kwargs), None, None
    if config.init_from:
        source = ModelDir.load(config.init_from)
        arch, loaded = source.architecture, source.variables
        model_kwargs = {**source.model_kwargs, **model_kwargs}
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
            "lr": mean("lr"),
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
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the workdir {workdir}: {error.strerror}") from None
    ModelDir.check_output(workdir / "model", overwrite=True)  # refuses a user's files there
    with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
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
    total_steps = (
        config.num_train_steps
        if config.num_train_steps > 0
        else max(1, int(config.num_epochs * steps_per_epoch))
    )
    model, variables, arch, model_kwargs, base_cfg = build_model(config, info.num_classes)
    data_cfg = data_config(config, arch, base_cfg)
    tx, schedule = create_optimizer(config, steps_per_epoch // config.grad_accum_steps)
    host_state = create_train_state(variables, tx, seed=config.seed, use_ema=config.ema_decay > 0)
    meta = {
        "class_names": list(info.class_names),
        "architecture": arch,
        "model_kwargs": model_kwargs,
        "dataset": config.dataset,
        "seed": config.seed,
        "steps_per_epoch": steps_per_epoch,
        "config": config.to_dict(),
    }

    train_step = compile_train_step(
        runner, model, tx, schedule, config, data_cfg["mean"], data_cfg["std"]
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
        if restored:
            log.info("resuming from %s at step %d", checkpoints.directory, step)
        logger = MetricsLogger(workdir, resume_step=start_step)
        stack.callback(logger.close)
        stop = stack.enter_context(StopRequest().installed())
        train_batches = pipeline.train_batches(
            config.dataset,
            batch_size=batch_size,
            image_size=config.image_size,
            interpolation=data_cfg["interpolation"],
            seed=config.seed,
            data_dir=config.data_dir,
            num_workers=config.data_workers,
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
            )
        )
        eval_metrics: dict[str, float] = {}
        window = _LogWindow(start_step)

        while step < total_steps:
            fed = feeder.next(interruptible)
            if fed is None:  # a signal while waiting for data: save what the last step made
                if step > start_step:
                    checkpoints.save(state, data_state, meta)
                progress.write(
                    f"signal {stop.signum} while waiting for data: saved step {step} "
                    f"to {checkpoints.directory}; run the same command again to resume"
                )
                return eval_metrics
            state, metrics = train_step(state, fed.batch)
            data_state = fed.data_state
            step += 1
            progress.update(1)
            window.metrics.append(metrics)
            window.wait_seconds += fed.wait_seconds
            if step == start_step + 1:  # keep compilation out of img/s and data_wait
                jax.block_until_ready(state)
                window.restart_clock(step)
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
                progress.write(
                    f"signal {stop.signum}: saved step {step} to "
                    f"{checkpoints.directory}; run the same command again to resume"
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
    return eval_metrics


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
