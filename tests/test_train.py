"""The per-device steps on 4 simulated CPU devices (tests/conftest.py), a tiny DPN, tiny data.

Compiling even a tiny DPN's train step takes tens of seconds on CPU, so the parity runs are
computed once per module and several tests read them. Whole runs: test_train_distributed.py.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import pytest
from train_worker import TINY, tiny_config

from configs import default
from dpn_jax import create_model
from dpn_jax.infer.evaluate import compile_eval_step
from dpn_jax.runtime.runner import Runner
from dpn_jax.train.config import (
    optimizer_settings,
    run_length,
    schedule_settings,
    step_settings,
)
from dpn_jax.train.optim import (
    RunLength,
    create_learning_rate_schedule,
    create_optimizer,
    path_mask,
)
from dpn_jax.train.state import create_train_state
from dpn_jax.train.step import compile_train_step, make_train_step

NUM_STEPS = 3
GLOBAL_BATCH = 8


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def synthetic_batches(num_steps: int, batch: int, seed: int = 0) -> list[dict]:
    """Random uint8 images brightened by their class."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(num_steps):
        labels = rng.randint(0, 10, batch).astype(np.int32)
        images = rng.normal(128, 40, (batch, 32, 32, 3)) + (labels[:, None, None, None] - 4.5) * 12
        out.append({"image": np.clip(np.rint(images), 0, 255).astype(np.uint8), "label": labels})
    return out


class Run(NamedTuple):
    state: Any  # host copy of the final train state
    losses: list[float]
    eval_sums: dict
    donated: list[bool]  # per step: did the step consume (donate) the state it was given


def run_steps(parallelism: str, devices) -> Run:
    """NUM_STEPS updates on the same global batches, then one eval step.

    Each step runs under `jax.transfer_guard("disallow")`: a host round-trip inside the step (a
    Python scalar argument, a value read back) fails the run.
    """
    config = tiny_config(learning_rate=0.01, ema_decay=0.9, parallelism=parallelism)
    runner = Runner(parallelism, devices)
    model, variables = create_model(
        "dpn68", num_classes=10, axis_name=runner.axis_name, rng=jax.random.key(0), **TINY
    )
    tx, schedule = create_optimizer(
        optimizer_settings(config), schedule_settings(config, RunLength(10, 30, 1))
    )
    state = runner.replicate(create_train_state(variables, tx, seed=0, use_ema=True))
    step = compile_train_step(
        runner, make_train_step(model, tx, schedule, step_settings(config, 10), MEAN, STD)
    )
    losses, donated = [], []
    batches = synthetic_batches(1, GLOBAL_BATCH) * NUM_STEPS  # the same batch: loss must fall
    for batch in batches:
        device_batch, previous = runner.put_batch(batch), state
        with jax.transfer_guard("disallow"):
            state, metrics = step(state, device_batch)
        donated.append(all(leaf.is_deleted() for leaf in jax.tree.leaves(previous)))
        losses.append(float(Runner.value(metrics["loss"])))
    eval_batch = dict(batches[0], mask=np.arange(GLOBAL_BATCH) < GLOBAL_BATCH - 1)
    sums = compile_eval_step(runner, model, MEAN, STD)(
        state.variables(), runner.put_batch(eval_batch)
    )
    return Run(Runner.value(state), losses, Runner.value(sums), donated)


@pytest.fixture(scope="module")
def parity_runs():
    assert jax.device_count() == 4, "tests/conftest.py must simulate 4 CPU devices"
    return {
        "shard_map4": run_steps("shard_map", jax.devices()),
        "shard_map1": run_steps("shard_map", jax.devices()[:1]),
        "pmap4": run_steps("pmap", jax.devices()),
    }


def assert_trees_close(a, b, atol):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_loss_decreases(parity_runs):
    losses = parity_runs["shard_map4"].losses
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses


def test_4_devices_equal_1_device(parity_runs):
    state4, losses4, sums4, _ = parity_runs["shard_map4"]
    state1, losses1, sums1, _ = parity_runs["shard_map1"]
    np.testing.assert_allclose(losses4, losses1, atol=1e-5)
    assert_trees_close(state4.params, state1.params, 1e-5)
    assert_trees_close(state4.batch_stats, state1.batch_stats, 1e-5)
    assert_trees_close(state4.ema, state1.ema, 1e-5)
    assert sums4["count"] == sums1["count"] == GLOBAL_BATCH - 1  # the masked example is left out
    np.testing.assert_allclose(sums4["loss"], sums1["loss"], rtol=1e-5)
    # Updates happened: params moved away from their initial values.
    _, init = create_model("dpn68", num_classes=10, rng=jax.random.key(0), **TINY)
    assert not np.allclose(
        state4.params["classifier"]["kernel"], init["params"]["classifier"]["kernel"]
    )


def test_pmap_adapter_equals_shard_map(parity_runs):
    """The same per-device step under `jax.pmap`: another XLA program, so float32 rounding
    differs (the stem's gradient sums ~8k products), but nothing else."""
    state_p, losses_p, sums_p, _ = parity_runs["pmap4"]
    state_s, losses_s, sums_s, _ = parity_runs["shard_map4"]
    np.testing.assert_allclose(losses_s, losses_p, atol=1e-5)
    assert_trees_close(state_s, state_p, 3e-5)
    assert_trees_close(sums_s, sums_p, 1e-5)


@pytest.mark.parametrize("run", ["pmap4", "shard_map4"])
def test_train_step_donates_its_state(parity_runs, run):
    """The step updates the train state in place (no second copy of params and optimizer state
    on the device); the transfer guard in `run_steps` already kept host copies out of it."""
    assert parity_runs[run].donated == [True] * NUM_STEPS


def test_weight_decay_mask_only_kernels():
    _, variables = create_model("dpn68", num_classes=10, rng=jax.random.key(0), **TINY)
    mask = path_mask(variables["params"], default.get_config().weight_decay_pattern)
    flat = dict(jax.tree_util.tree_flatten_with_path(mask)[0])
    names = {jax.tree_util.keystr(k): v for k, v in flat.items()}
    assert names["['classifier']['kernel']"] and not names["['classifier']['bias']"]
    assert names["['features']['conv2_1']['c3x3_b']['conv']['kernel']"]
    assert not names["['features']['conv2_1']['c3x3_b']['bn']['scale']"]
    assert not names["['features']['conv2_1']['c3x3_b']['bn']['bias']"]


def timm_learning_rates(config, length: RunLength) -> list[float]:
    """The LR of each optimizer update under timm's own scheduler, driven as timm's train.py
    drives it: `step(epoch)` per epoch or `step_update(num_updates)` after each update."""
    import torch
    from timm.scheduler import create_scheduler_v2

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=config.schedule,
        num_epochs=length.total_updates / length.updates_per_epoch - config.cooldown_epochs,
        decay_epochs=config.decay_epochs,
        decay_milestones=list(config.decay_milestones),
        cooldown_epochs=config.cooldown_epochs,
        decay_rate=config.decay_rate,
        min_lr=config.min_lr,
        warmup_lr=config.warmup_lr,
        warmup_epochs=config.warmup_epochs,
        step_on_epochs=not config.sched_on_updates,
        updates_per_epoch=length.updates_per_epoch,
    )
    rates = []
    for update in range(length.total_updates + 1):  # + 1: the LR after the last update
        if update and config.sched_on_updates:
            scheduler.step_update(num_updates=update)
        elif update % length.updates_per_epoch == 0 and update:
            scheduler.step(update // length.updates_per_epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


SCHEDULE_CASES = {
    "cosine_per_update": dict(schedule="cosine", warmup_epochs=2.0, min_lr=0.01),
    "cosine_cooldown": dict(schedule="cosine", warmup_epochs=1.0, cooldown_epochs=2.0),
    "cosine_per_epoch": dict(schedule="cosine", warmup_epochs=2.0, sched_on_updates=False),
    "step_per_update": dict(schedule="step", warmup_epochs=1.0, decay_epochs=2.4, decay_rate=0.5),
    "step_per_epoch": dict(schedule="step", decay_epochs=3, decay_rate=0.5, sched_on_updates=False),
    "multistep": dict(schedule="multistep", decay_milestones=(3, 7), warmup_epochs=1.0),
    "constant": dict(schedule="constant", warmup_epochs=1.5),
}


@pytest.mark.parametrize("case", SCHEDULE_CASES)
def test_schedules_equal_timms_schedulers(case):
    """Every update's LR equals timm's, and the cosine ends at min_lr after the last update."""
    config = tiny_config(
        num_epochs=10.0, learning_rate=0.4, warmup_lr=0.001, **SCHEDULE_CASES[case]
    )
    length = run_length(config, steps_per_epoch=10)
    settings = schedule_settings(config, length)
    ours = [
        float(create_learning_rate_schedule(settings)(k)) for k in range(length.total_updates + 1)
    ]
    np.testing.assert_allclose(ours, timm_learning_rates(config, length), rtol=1e-6, atol=1e-7)
    if config.schedule == "cosine" and not config.cooldown_epochs:
        assert ours[-1] == pytest.approx(config.min_lr) and ours[-2] > config.min_lr


def test_learning_rate_scales_with_the_effective_batch():
    config = tiny_config(learning_rate=0.4, batch_size=64, base_batch_size=32, grad_accum_steps=2)
    settings = schedule_settings(config, RunLength(10, 100, 2))
    assert settings.lr == pytest.approx(1.6) and settings.updates_per_epoch == 5


@pytest.mark.parametrize("bce, thresh", [(False, None), (True, None), (True, 0.2)])
@pytest.mark.parametrize("soft", [False, True])
def test_losses_equal_timms(bce, thresh, soft):
    """Hard labels (smoothed here) and mixup's soft targets, against timm's loss classes."""
    import torch
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from dpn_jax.data.batch_augment import mixup_target
    from dpn_jax.train.step import classification_loss

    rng = np.random.RandomState(0)
    logits = rng.normal(0, 2, (6, 7)).astype(np.float32)
    labels = rng.randint(0, 7, 6)
    targets = np.array(mixup_target(labels, 7, 0.7, 0.1)) if soft else labels
    ours = classification_loss(
        logits, targets, smoothing=0.0 if soft else 0.1, bce=bce, bce_target_thresh=thresh
    )
    if bce:
        reference = BinaryCrossEntropy(smoothing=0.0 if soft else 0.1, target_threshold=thresh)
    else:
        reference = SoftTargetCrossEntropy() if soft else LabelSmoothingCrossEntropy(0.1)
    target_tensor = torch.from_numpy(targets) if soft else torch.from_numpy(labels).long()
    expected = reference(torch.from_numpy(logits), target_tensor).item()
    assert float(ours) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_decay_equals_timm_model_ema_v3(warmup):
    import torch
    from timm.utils import ModelEmaV3

    from dpn_jax.train.step import ema_decay_at

    ema = ModelEmaV3(torch.nn.Linear(1, 1), decay=0.999, use_warmup=warmup)
    for update in (1, 2, 3, 10, 1000, 10**6):
        ours = float(ema_decay_at(np.int32(update), 0.999, warmup))
        assert ours == pytest.approx(ema.get_decay(update), rel=1e-6, abs=1e-7), update
