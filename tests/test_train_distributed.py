"""train.py / the trainer as subprocesses: resume after SIGKILL, SIGTERM, NaN, fine-tuning, 2 processes.

Every run uses the same tiny config (tests/train_worker.py), so with a shared persistent
compilation cache the 4-device train step compiles once for the whole module.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "train_worker.py"
from train_worker import TINY
DIGITS_RUN = {"num_train_steps": 66, "checkpoint_every_steps": 33}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                XLA_FLAGS="--xla_force_host_platform_device_count=4",
                JAX_COMPILATION_CACHE_DIR=str(cache), DPN_JAX_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                PYTHONPATH=str(ROOT))


def worker(workdir, overrides, *extra, env, check=True, **kwargs):
    cmd = [sys.executable, str(WORKER), str(workdir), json.dumps(overrides), *map(str, extra)]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            **kwargs)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics_of(result) -> dict:
    line = next(l for l in result.stdout.splitlines() if l.startswith("METRICS "))
    return json.loads(line[len("METRICS "):])


def model_variables(workdir):
    from dpn_jax.weights.model_dir import ModelDir
    model_dir = ModelDir.load(Path(workdir) / "model")
    return model_dir.variables, model_dir


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, env):
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, metrics_of(worker(workdir, DIGITS_RUN, env=env))


def test_digits_run_learns_and_writes_records(straight_run):
    workdir, metrics = straight_run
    assert metrics["eval_examples"] == 360
    assert metrics["eval_top1"] > 0.3, metrics  # chance is 0.1
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    evals = [r for r in records if "eval_top1" in r]
    assert [r["step"] for r in evals] == [44, 66]  # every epoch (44 steps) and at the end
    assert {"step", "epoch", "eval_top1", "eval_top5", "eval_loss", "eval_examples"} <= set(evals[-1])
    assert 0.0 <= evals[-1]["eval_top1"] <= evals[-1]["eval_top5"] <= 1.0
    assert len([r for r in records if "train_loss" in r]) == 66
    assert (workdir / "training_curves.png").stat().st_size > 1000
    assert list((workdir / "tensorboard").iterdir())
    assert checkpoint_steps(workdir) == [33, 66]
    _, model_dir = model_variables(workdir)
    assert model_dir.class_names == tuple(str(d) for d in range(10))
    assert model_dir.num_classes == 10 and model_dir.architecture == "dpn68"


def test_resume_after_sigkill_equals_straight_run(straight_run, tmp_path, env):
    reference, _ = straight_run
    killed = worker(tmp_path, DIGITS_RUN, "--kill-after-checkpoint", 33, env=env, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint_steps(tmp_path) == [33] and not (tmp_path / "model").exists()
    # A save cut off mid-way (orbax's temporary directory) must be ignored.
    (tmp_path / "checkpoints" / "50.orbax-checkpoint-tmp-123").mkdir()
    worker(tmp_path, DIGITS_RUN, env=env)
    resumed, _ = model_variables(tmp_path)
    straight, _ = model_variables(reference)
    for name, value in flat(straight).items():
        np.testing.assert_array_equal(flat(resumed)[name], value, err_msg=name)


def test_sigterm_saves_and_exits_0(tmp_path, env):
    flags = [f"--config.model_kwargs.{k}={v}" for k, v in TINY.items()] + [
        "--config.image_size=32", "--config.batch_size=32", "--config.base_batch_size=32",
        "--config.eval_batch_size=40", "--config.schedule=constant", "--config.warmup_epochs=0",
        "--config.learning_rate=0.05",
        "--config.log_every_steps=1", "--config.num_train_steps=100000"]
    proc = subprocess.Popen([sys.executable, "train.py", "--workdir", str(tmp_path), *flags],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 400
    while not (tmp_path / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    steps = checkpoint_steps(tmp_path)
    assert len(steps) == 1 and 0 < steps[0] < 100000
    assert f"saved step {steps[0]}" in err + out


def test_nan_fails_naming_the_step_and_is_never_saved(tmp_path, env):
    result = worker(tmp_path, {"num_train_steps": 20, "checkpoint_every_steps": 3},
                    "--poison-step", 5, env=env, check=False)
    assert result.returncode != 0
    assert "FloatingPointError: loss or gradient became NaN/Inf at step 6 " in result.stderr
    assert checkpoint_steps(tmp_path) == [3]


def test_nan_step_skipped_when_configured(tmp_path, env):
    result = worker(tmp_path, {"num_train_steps": 8, "skip_nonfinite_updates": True},
                    "--poison-step", 2, env=env)
    assert np.isfinite(metrics_of(result)["eval_loss"])
    variables, _ = model_variables(tmp_path)
    assert all(np.isfinite(v).all() for v in flat(variables).values())


def test_finetune_from_converted_checkpoint_with_new_head(tmp_path, env):
    import jax
    from dpn_jax import create_model
    from dpn_jax.weights.model_dir import ModelDir, Preprocessing

    _, source = create_model("dpn68", num_classes=7, rng=jax.random.key(42), **TINY)
    source_dir = tmp_path / "converted"
    ModelDir(architecture="dpn68", num_classes=7, model_kwargs=TINY, variables=source,
             preprocessing=Preprocessing(input_size=(32, 32), crop_pct=1.0,
                                         interpolation="bilinear", mean=(0.5,) * 3,
                                         std=(0.25,) * 3),
             source="test").save(source_dir)
    workdir = tmp_path / "run"
    worker(workdir, {"init_from": str(source_dir), "num_train_steps": 1, "model": "dpn92",
                     "model_kwargs": {}}, env=env)
    tuned, model_dir = model_variables(workdir)
    assert model_dir.num_classes == 10 and model_dir.architecture == "dpn68"
    assert model_dir.preprocessing.mean == (0.5,) * 3  # preprocessing of the source
    assert tuned["params"]["classifier"]["kernel"].shape[-1] == 10
    stem, stem_source = (v["params"]["features"]["conv1_1"]["conv"]["kernel"] for v in (tuned, source))
    _, fresh = create_model("dpn68", num_classes=10, rng=jax.random.key(0), **TINY)
    stem_fresh = fresh["params"]["features"]["conv1_1"]["conv"]["kernel"]
    assert np.abs(stem - stem_source).mean() < 0.5 * np.abs(stem - stem_fresh).mean()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_matches_single_process(tmp_path, env):
    run = {"num_train_steps": 2}
    single = worker(tmp_path / "single", run, "--synthetic-data", env=env)
    address = f"127.0.0.1:{free_port()}"
    env2 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path / "multi"), json.dumps(run), "--synthetic-data",
         "--coordinator", address, "--num-processes", "2", "--process-id", str(i)],
        env=env2, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    multi_metrics = json.loads(outputs[0][0].split("METRICS ")[1])
    single_metrics = metrics_of(single)
    assert multi_metrics["eval_examples"] == single_metrics["eval_examples"] == 360
    assert multi_metrics["eval_top1"] == pytest.approx(single_metrics["eval_top1"], abs=1e-6)
    multi_vars, _ = model_variables(tmp_path / "multi")
    single_vars, _ = model_variables(tmp_path / "single")
    # gloo and the in-process all-reduce sum in different orders; the stem's BatchNorm bias
    # gradient cancels to ~1e-3 of its terms, so its rounding shows at ~1e-5 after an update.
    for name, value in flat(single_vars).items():
        np.testing.assert_allclose(flat(multi_vars)[name], value, rtol=1e-5, atol=3e-5, err_msg=name)
