"""dpn_jax's train step against PyTorch + timm, step for step, in float64 on both sides.

The same converted timm DPN (tiny) is trained for NUM_STEPS batches by `train.py`'s own step
(`create_optimizer`, `compile_train_step`) and by timm's pieces as timm's train.py wires them:
`create_optimizer_v2` (with its no-weight-decay groups), `create_scheduler_v2`, its losses,
`dispatch_clip_grad`, `ModelEmaV3`, accumulation as loss / k with a step every k batches.
Float32 cannot be compared step for step (train-mode BatchNorm makes the gradients ill
conditioned: the issue's measurements), so both sides run in float64; JAX needs
JAX_ENABLE_X64 for that, process-wide, so the runs happen in one subprocess (this file's
`__main__`), each configuration compiled once, and the tests compare what it saved.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS = 8
BATCH = 4
STEPS_PER_EPOCH = 2
NUM_CLASSES = 5

# Each configuration compiles the step once; together they cover every optimizer, schedule,
# loss, clipping mode, accumulation and the EMA with and without warm-up.
CASES = {
    "momentum_cosine_ema": dict(
        opt="momentum", warmup_epochs=1.0, warmup_lr=1e-3, min_lr=1e-4, ema_decay=0.8
    ),
    "nesterov_step_smoothing_accum_ema_warmup_clip_norm": dict(
        opt="sgd",
        schedule="step",
        warmup_epochs=1.0,
        decay_epochs=1.0,
        decay_rate=0.5,
        smoothing=0.1,
        grad_accum_steps=2,
        ema_decay=0.9,
        ema_warmup=True,
        clip_grad=0.5,
        clip_mode="norm",
    ),
    "adamw_bce_smoothing_multistep_clip_value": dict(
        opt="adamw",
        learning_rate=2e-3,
        weight_decay=0.05,
        bce_loss=True,
        smoothing=0.1,
        schedule="multistep",
        decay_milestones=(1, 3),
        clip_grad=0.01,
        clip_mode="value",
    ),
    "lamb_bce_threshold_agc": dict(
        opt="lamb",
        learning_rate=5e-3,
        weight_decay=0.02,
        bce_loss=True,
        bce_target_thresh=0.2,
        clip_grad=0.05,
        clip_mode="agc",
        schedule="constant",
    ),
    "rmsproptf_cosine_per_epoch": dict(
        opt="rmsproptf",
        learning_rate=1e-3,
        opt_eps=1e-3,
        weight_decay=1e-3,
        sched_on_updates=False,
        warmup_epochs=1.0,
    ),
}
COMMON = dict(
    batch_size=BATCH,
    base_batch_size=BATCH,
    learning_rate=0.05,
    weight_decay=1e-2,
    warmup_epochs=0.0,
    warmup_lr=1e-4,
)


def case_config(name: str, dtype: str = "float64"):
    from train_worker import tiny_config

    return tiny_config(dtype=dtype, **{**COMMON, **CASES[name]})


def batches(seed: int = 0) -> list[dict]:
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(NUM_STEPS + 1):  # the last one is for the final eval logits
        labels = rng.randint(0, NUM_CLASSES, BATCH).astype(np.int32)
        images = rng.normal(128, 50, (BATCH, 32, 32, 3)) + labels[:, None, None, None] * 10
        out.append({"image": np.clip(np.rint(images), 0, 255).astype(np.uint8), "label": labels})
    return out


def reference_model(dtype):
    """A tiny timm DPN (the TINY shape of the trainer tests) with non-trivial BatchNorms,
    initialised in float32 (the converter's dtype) so both sides start from the same weights."""
    import torch
    from timm.models.dpn import DPN
    from train_worker import TINY

    torch.manual_seed(0)
    model = DPN(small=True, num_classes=NUM_CLASSES, **TINY)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.2)
    return model.to(dtype)


def run_torch(config, images: list, labels: list) -> dict:
    """timm train.py's loop on the same normalised batches (float32 normalisation, as ours)."""
    import torch
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy
    from timm.models import model_parameters
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, dispatch_clip_grad

    from dpn_jax.train.config import scaled_learning_rate

    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    model = reference_model(dtype)
    initial = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    optimizer = create_optimizer_v2(
        model,
        opt=config.opt,
        lr=scaled_learning_rate(config),  # timm's lr_base * global batch / lr_base_size
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        **({"eps": config.opt_eps} if config.opt_eps is not None else {}),
    )
    accum = config.grad_accum_steps
    updates_per_epoch = -(-STEPS_PER_EPOCH // accum)
    total_updates = NUM_STEPS // accum
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=config.schedule,
        num_epochs=total_updates / updates_per_epoch,
        decay_epochs=config.decay_epochs,
        decay_milestones=list(config.decay_milestones),
        decay_rate=config.decay_rate,
        min_lr=config.min_lr,
        warmup_lr=config.warmup_lr,
        warmup_epochs=config.warmup_epochs,
        step_on_epochs=not config.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    if config.bce_loss:
        loss_fn = BinaryCrossEntropy(
            smoothing=config.smoothing, target_threshold=config.bce_target_thresh
        )
    elif config.smoothing:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=config.smoothing)
    else:
        loss_fn = torch.nn.CrossEntropyLoss()
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=config.ema_warmup)
    losses, rates, updates = [], [], 0
    model.train()
    for i in range(NUM_STEPS):
        x = torch.from_numpy(images[i].transpose(0, 3, 1, 2).copy()).to(dtype)
        loss = loss_fn(model(x), torch.from_numpy(labels[i]).long())
        losses.append(loss.item())
        (loss / accum).backward()
        if (i + 1) % accum:
            continue
        if config.clip_grad is not None:
            parameters = model_parameters(model, exclude_head="agc" in config.clip_mode)
            dispatch_clip_grad(parameters, value=config.clip_grad, mode=config.clip_mode)
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        optimizer.zero_grad()
        updates += 1
        if config.sched_on_updates:
            scheduler.step_update(num_updates=updates)
        elif updates % updates_per_epoch == 0:
            scheduler.step(updates // updates_per_epoch)
        ema.update(model, step=updates)
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(images[-1].transpose(0, 3, 1, 2).copy()).to(dtype)
        logits = model(x).numpy()
    state = lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}  # noqa: E731
    return dict(
        initial=initial,
        losses=losses,
        rates=rates,
        final=state(model),
        ema=state(ema.module),
        logits=logits,
    )


def run_jax(config, initial_state_dict: dict, images: list, data: list) -> dict:
    """`train.py`'s step on the converted initial weights."""
    import jax
    import jax.numpy as jnp
    from train_worker import TINY

    from dpn_jax import create_model
    from dpn_jax.runtime.runner import Runner
    from dpn_jax.train.config import optimizer_settings, schedule_settings, step_settings
    from dpn_jax.train.optim import RunLength, create_optimizer
    from dpn_jax.train.state import create_train_state
    from dpn_jax.train.step import compile_train_step, make_train_step
    from dpn_jax.weights.convert import flax_to_timm, timm_to_flax

    dtype = np.float64 if config.dtype == "float64" else np.float32
    runner = Runner("shard_map", jax.devices()[:1])
    model, _ = create_model(
        "dpn68", num_classes=NUM_CLASSES, dtype=jnp.dtype(dtype), axis_name=runner.axis_name, **TINY
    )
    variables = jax.tree.map(
        lambda x: np.asarray(x, dtype), timm_to_flax(initial_state_dict, "dpn68", **TINY)
    )
    length = RunLength(STEPS_PER_EPOCH, NUM_STEPS, config.grad_accum_steps)
    tx, schedule = create_optimizer(optimizer_settings(config), schedule_settings(config, length))
    state = runner.replicate(
        create_train_state(variables, tx, seed=0, use_ema=config.ema_decay > 0)
    )
    settings = step_settings(config, NUM_CLASSES)
    step = compile_train_step(runner, make_train_step(model, tx, schedule, settings, MEAN, STD))
    losses = []
    for batch in data[:NUM_STEPS]:
        state, metrics = step(state, runner.put_batch(batch))
        losses.append(float(Runner.value(metrics["loss"])))
    state = Runner.value(state)
    float_leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    logits = model.apply(state.variables(), jnp.asarray(images[-1], dtype), train=False)
    as_timm = lambda v: flax_to_timm(jax.device_get(v), "dpn68", **TINY)  # noqa: E731
    return dict(
        losses=losses,
        rates=[float(schedule(k)) for k in range(length.total_updates)],
        final=as_timm(state.variables()),
        ema=as_timm(state.variables(ema=True)) if state.ema is not None else {},
        logits=np.asarray(logits),
        state_dtypes=sorted({str(x.dtype) for x in float_leaves}),
    )


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def run_case(name: str, dtype: str = "float64") -> dict:
    config = case_config(name, dtype)
    data = batches()
    # timm's ToTensor + Normalize in the run's dtype, as the step computes it
    images = [
        ((b["image"].astype(dtype) / 255 - np.asarray(MEAN, dtype)) / np.asarray(STD, dtype))
        for b in data
    ]
    torch_run = run_torch(config, images, [b["label"] for b in data])
    jax_run = run_jax(config, torch_run.pop("initial"), images, data)
    return {"torch": torch_run, "jax": jax_run}


def save(runs: dict, path: Path) -> None:
    flat = {}
    for side, run in runs.items():
        for key, value in run.items():
            if isinstance(value, dict):
                flat.update({f"{side}/{key}/{k}": v for k, v in value.items()})
            else:
                flat[f"{side}/{key}"] = np.asarray(value)
    np.savez(path, **flat)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("torch_parity")
    env = dict(
        os.environ,
        JAX_ENABLE_X64="1",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",  # one device: the step's cross-device means are tested elsewhere
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    )
    result = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {name: dict(np.load(out / f"{name}.npz")) for name in CASES}


def relative(actual, expected) -> float:
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    return float(np.max(np.abs(np.asarray(actual) - expected))) / scale


@pytest.mark.parametrize("name", CASES)
def test_each_step_equals_pytorch_in_float64(runs, name):
    run = runs[name]
    np.testing.assert_allclose(run["jax/losses"], run["torch/losses"], rtol=1e-6)
    np.testing.assert_allclose(run["jax/rates"], run["torch/rates"], rtol=1e-12, atol=0)
    assert len(run["jax/losses"]) == NUM_STEPS
    # params, BatchNorm statistics, optimizer state and EMA: all float64
    assert list(run["jax/state_dtypes"]) == ["float64"]
    for part in ("final", "ema") if CASES[name].get("ema_decay") else ("final",):
        keys = [k for k in run if k.startswith(f"torch/{part}/") and "num_batches" not in k]
        assert keys
        for key in keys:
            ours = run[key.replace("torch/", "jax/", 1)]  # float32: flax_to_timm's dtype
            assert relative(ours, run[key]) <= 1e-6, (key, relative(ours, run[key]))
    assert relative(run["jax/logits"], run["torch/logits"]) <= 1e-5


def test_training_moved_the_weights(runs):
    """The comparison compares trained weights, not two copies of the initial ones."""
    run = runs["momentum_cosine_ema"]
    final, ema = run["torch/final/classifier.weight"], run["torch/ema/classifier.weight"]
    assert relative(final, ema) > 1e-3


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    for case in CASES:
        save(run_case(case), Path(sys.argv[1]) / f"{case}.npz")
