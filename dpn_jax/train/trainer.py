"""Data-parallel DPN training: `train_and_evaluate(config, workdir)`.

The per-device steps (`make_train_step`, `make_eval_step`) use explicit collectives over the
`batch` axis and run under `jax.pmap` or `jax.shard_map` (`config.parallelism`, see
`dpn_jax.runtime.runner`). A run resumes from the latest checkpoint in WORKDIR on start and stops
cleanly (save, return) on SIGTERM/SIGINT.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax import lax
from jax.experimental import multihost_utils

from dpn_jax.data import pipeline
from dpn_jax.data.transforms import normalize
from dpn_jax.train.optim import create_optimizer
from dpn_jax.runtime.runner import AXIS, Runner
from dpn_jax.factory import create_model
from dpn_jax.models.registry import pretrained_cfg
from dpn_jax.train.logger import MetricsLogger
from dpn_jax.train.state import (TrainState, checkpoint_manager, create_train_state,
                                 merge_for_finetuning, restore_latest, save_checkpoint)

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Mean softmax cross-entropy against (optionally smoothed) one-hot labels."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits, per example."""
    k = min(k, logits.shape[-1])
    return jnp.any(lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    config: ml_collections.ConfigDict) -> Callable:
    """One device's SGD step; gradients and metrics are averaged over the `batch` axis.

    A step whose loss or gradient is NaN/Inf changes nothing but `step` and records itself in
    `nonfinite_step` (the trainer then fails or carries on, per `config.skip_nonfinite_updates`).
    """
    accum = config.grad_accum_steps

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_rng = jax.random.fold_in(
            jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
            lax.axis_index(AXIS))

        def loss_fn(params):
            logits, new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
                mutable=["batch_stats"], rngs={"dropout": dropout_rng})
            return cross_entropy(logits, batch["label"], config.label_smoothing), (logits, new_vars)

        (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        batch_stats = new_vars["batch_stats"]  # already averaged over AXIS by the BatchNorms

        ema = state.ema
        if ema is not None:
            applied = tx.has_updated(opt_state) if isinstance(tx, optax.MultiSteps) else True
            decay = jnp.where(applied, config.ema_decay, 1.0)
            ema = optax.incremental_update({"params": params, "batch_stats": batch_stats},
                                           ema, step_size=1.0 - decay)

        metrics = lax.pmean({"loss": loss, "top1": top_k_correct(logits, batch["label"], 1).mean()},
                            AXIS)
        finite = jnp.isfinite(metrics["loss"]) & _all_finite(grads)
        updated = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        new_state = new_state.replace(
            step=state.step + 1,
            nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite,
                                     state.step + 1, state.nonfinite_step))
        metrics["lr"] = schedule(state.step // accum)
        return new_state, metrics

    return train_step


def make_eval_step(model) -> Callable:
    """One device's sums of loss / top-1 / top-5 / count over real (mask True) examples, psummed."""

    def eval_step(variables: dict, batch: dict) -> dict:
        logits = model.apply(variables, batch["image"], train=False)
        mask = batch["mask"].astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        sums = {"loss": jnp.sum(losses * mask),
                "top1": jnp.sum(top_k_correct(logits, batch["label"], 1) * mask),
                "top5": jnp.sum(top_k_correct(logits, batch["label"], 5) * mask),
                "count": jnp.sum(mask)}
        return lax.psum(sums, AXIS)

    return eval_step


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop reads after each step (the step finishes first)."""

    def __init__(self):
        self.signum: int | None = None

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self) -> bool:
        """Whether any process was asked to stop (a collective: call at the same step everywhere)."""
        local = self.signum is not None
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def data_config(config: ml_collections.ConfigDict, model_name: str,
                base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preprocessing: config values where set, else the fine-tuning source's, else the tag's."""
    cfg = dict(base or pretrained_cfg(model_name))
    for key in ("mean", "std", "crop_pct", "interpolation"):
        if config.get(key) is not None:
            cfg[key] = config[key]
    size = config.image_size
    return dict(cfg, input_size=(size, size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                test_input_size=None, test_crop_pct=None)


def _per_process(global_batch: int, what: str) -> int:
    per_process, remainder = divmod(global_batch, jax.process_count())
    if remainder or per_process % jax.local_device_count():
        raise ValueError(f"{what}={global_batch} must be a multiple of the "
                         f"{jax.device_count()} devices")
    return per_process


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The model and its initial variables: fresh, or a model directory's with a new head.

    Returns (model, variables, architecture, model_kwargs, preprocessing base cfg or None).
    """
    arch, model_kwargs, base_cfg, loaded = config.model, dict(config.model_kwargs), None, None
    if config.init_from == "":
        raise ValueError("this config fine-tunes: set --config.init_from=DIR (a model directory "
                         "written by dpn-convert or by train.py)")
    if config.init_from:
        from dpn_jax.weights.pretrained import load_model_dir
        loaded, metadata = load_model_dir(config.init_from)
        arch = metadata["architecture"]
        model_kwargs = {**metadata.get("model_kwargs", {}), **model_kwargs}
        base_cfg = metadata.get("pretrained_cfg")
    model, variables = create_model(
        arch, num_classes=num_classes, dtype=DTYPES[config.dtype], drop_rate=config.drop_rate,
        rng=jax.random.key(config.seed), axis_name=AXIS, **model_kwargs)
    if loaded is not None:
        variables = merge_for_finetuning(variables, loaded, config.init_from)
    return model, variables, arch, model_kwargs, base_cfg


def evaluate(p_eval_step: Callable, variables: Any, batches: Iterator[Any]) -> dict[str, float]:
    """Loss, top-1 and top-5 (fractions) over every real example of the eval split."""
    sums = None
    for batch in batches:
        out = p_eval_step(variables, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    total = Runner.first(sums)
    count = float(total["count"])
    return {"eval_loss": float(total["loss"]) / count, "eval_top1": float(total["top1"]) / count,
            "eval_top5": float(total["top5"]) / count, "eval_examples": int(count)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Train `config` in `workdir` (resuming if it holds checkpoints); returns the last eval metrics.

    Every epoch (and at the end) the full eval split is evaluated, with the EMA weights too when
    `ema_decay` > 0. At the end the weights (EMA if enabled) are exported to WORKDIR/model.
    """
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype={config.dtype!r}; choose from {sorted(DTYPES)}")
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    runner = Runner(config.parallelism)
    is_main = jax.process_index() == 0

    info = pipeline.dataset_info(config.dataset, data_dir=config.data_dir,
                                       eval_split=config.eval_split)
    model, variables, arch, model_kwargs, base_cfg = build_model(config, info.num_classes)
    data_cfg = data_config(config, arch, base_cfg)
    steps_per_epoch = info.num_train_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {info.num_train_examples} "
                         f"training examples of {config.dataset}")
    total_steps = config.num_train_steps if config.num_train_steps > 0 else int(
        config.num_epochs * steps_per_epoch)
    tx, schedule = create_optimizer(config, steps_per_epoch // config.grad_accum_steps)
    host_state = create_train_state(variables, tx, seed=config.seed, use_ema=config.ema_decay > 0)
    ckpt_meta = {"class_names": list(info.class_names), "architecture": arch,
                 "model_kwargs": model_kwargs, "dataset": config.dataset, "seed": config.seed,
                 "steps_per_epoch": steps_per_epoch, "config": config.to_dict()}

    def for_devices(batches):  # per-process batches -> [local devices, per device, ...]
        n = runner.num_local_devices
        return ({k: v.reshape(n, -1, *v.shape[1:]) for k, v in b.items()} for b in batches)

    def eval_batches():
        return runner.prefetch(for_devices(pipeline.eval_batches(
            config.dataset, batch_size=_per_process(config.eval_batch_size, "eval_batch_size"),
            image_size=config.image_size, crop_pct=data_cfg["crop_pct"],
            interpolation=data_cfg["interpolation"], data_dir=config.data_dir,
            eval_split=config.eval_split)))

    def on_model_input(step):  # uint8 images are normalised on the device, inside the step
        def normalized_step(first, batch):
            image = normalize(batch["image"], data_cfg["mean"], data_cfg["std"], jnp.float32)
            return step(first, {**batch, "image": image})
        return normalized_step

    def check_finite(state) -> None:
        bad = int(Runner.first(state.nonfinite_step))
        if bad >= 0 and not config.skip_nonfinite_updates:
            raise FloatingPointError(
                f"loss or gradient became NaN/Inf at step {bad} (epoch "
                f"{(bad - 1) // steps_per_epoch + 1}); that update was not applied. Lower the "
                "learning rate, or set --config.skip_nonfinite_updates=True to skip such steps")

    p_train_step = runner.compile(on_model_input(make_train_step(model, tx, schedule, config)),
                                  donate_first=True)
    p_eval_step = runner.compile(on_model_input(make_eval_step(model)))

    with contextlib.ExitStack() as stack:  # closing the manager waits for pending saves
        manager = stack.enter_context(checkpoint_manager(workdir, config))
        logger = stack.enter_context(contextlib.closing(MetricsLogger(workdir)))
        stop = stack.enter_context(StopRequest().installed())
        restored = restore_latest(manager, host_state)
        if restored is not None:
            host_state, _ = restored
            log.info("resuming from %s at step %d", manager.directory, int(host_state.step))
        start_step = step = int(host_state.step)
        state = runner.replicate(host_state)
        train_batches = runner.prefetch(for_devices(pipeline.train_batches(
            config.dataset, batch_size=_per_process(config.batch_size, "batch_size"),
            image_size=config.image_size, interpolation=data_cfg["interpolation"],
            seed=config.seed, data_dir=config.data_dir, start_batch=start_step)))
        progress = stack.enter_context(tqdm.tqdm(
            total=total_steps, initial=start_step, disable=not is_main, desc="train", unit="step",
            dynamic_ncols=True))
        eval_metrics: dict[str, float] = {}
        pending: list[dict] = []
        last_log = (time.perf_counter(), start_step)

        while step < total_steps:
            state, metrics = p_train_step(state, next(train_batches))
            pending.append(metrics)
            step += 1
            progress.update(1)
            if step == start_step + 1:  # keep compilation out of img/s
                jax.block_until_ready(state)
                last_log = (time.perf_counter(), step)
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if step % config.log_every_steps == 0 or epoch_end:
                check_finite(state)
                now = time.perf_counter()
                train = {k: float(np.mean([Runner.first(m[k]) for m in pending])) for k in pending[0]}
                rate = (step - last_log[1]) * config.batch_size / max(now - last_log[0], 1e-9)
                last_log, pending = (now, step), []
                logger.write(step, {"train_loss": train["loss"], "train_top1": train["top1"],
                                    "lr": train["lr"], "img_per_sec": rate},
                             epoch=step / steps_per_epoch)
                progress.set_postfix(loss=f"{train['loss']:.4f}", top1=f"{train['top1']:.3f}",
                                     img_s=f"{rate:.0f}", lr=f"{train['lr']:.4g}")
            if epoch_end:
                eval_metrics = evaluate(p_eval_step, state.variables(), eval_batches())
                if state.ema is not None:
                    ema_metrics = evaluate(p_eval_step, state.variables(ema=True), eval_batches())
                    eval_metrics.update({f"{k}_ema": v for k, v in ema_metrics.items()
                                         if k != "eval_examples"})
                epoch = int(np.ceil(step / steps_per_epoch))
                logger.write(step, eval_metrics, epoch=epoch)
                progress.write(f"epoch {epoch} (step {step}): train_loss {train['loss']:.4f}, "
                               f"train_top1 {train['top1']:.4f}, " + ", ".join(
                                   f"{k} {v:.4g}" for k, v in eval_metrics.items()))
                last_log = (time.perf_counter(), step)  # keep eval time out of img/s
            # Multi-process runs agree on stopping at log steps only (a collective each time).
            stopping = ((jax.process_count() == 1 or step % config.log_every_steps == 0)
                        and stop.agreed())
            if step % config.checkpoint_every_steps == 0 or step == total_steps or stopping:
                check_finite(state)
                save_checkpoint(manager, Runner.first(state), ckpt_meta)
            if stopping:
                progress.write(f"signal {stop.signum}: saved step {step} to {manager.directory}; "
                               "run the same command again to resume")
                return eval_metrics

        if step == total_steps:  # (also when resuming a finished run: re-export)
            final = Runner.first(state)
            export_model(os.path.join(workdir, "model"), final.variables(ema=final.ema is not None),
                         arch=arch, model_kwargs=model_kwargs, num_classes=info.num_classes,
                         data_cfg=data_cfg, class_names=info.class_names, workdir=workdir)
            logger.plot_curves()
    return eval_metrics


def export_model(path: str, variables: dict, *, arch: str, model_kwargs: dict, num_classes: int,
                 data_cfg: dict, class_names, workdir: str) -> None:
    """The trained weights as a model directory `dpn-predict --checkpoint` and `create_model` read.

    Process 0 writes it; the others wait, so none exits while it is being written.
    """
    if jax.process_index() == 0:
        from dpn_jax import __version__
        from dpn_jax.weights.pretrained import save_model_dir
        pretrained = {k: data_cfg[k] for k in ("input_size", "crop_pct", "interpolation", "mean",
                                               "std", "test_input_size", "test_crop_pct")}
        metadata = {"architecture": arch, "num_classes": num_classes, "model_kwargs": model_kwargs,
                    "pretrained_cfg": pretrained, "class_names": list(class_names),
                    "source": f"dpn_jax train.py, workdir {workdir}", "sha256": None,
                    "dpn_jax_version": __version__}
        save_model_dir(path, variables, metadata, overwrite=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dpn_jax export_model")
