"""Whole training runs in subprocesses (tests/train_worker.py, train.py) on 4 simulated devices:
records, exact resume after SIGKILL and SIGTERM, NaN, fine-tuning, one run per workdir,
damaged checkpoints and a full disk.

Every run uses the same tiny config, so with the shared persistent compilation cache the train
step compiles once for the whole module.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from runs import (
    ROOT,
    assert_same_variables,
    checkpoint_steps,
    flat,
    metrics_of,
    metrics_records,
    model_variables,
    run_worker,
    start_worker,
    subprocess_env,
)
from train_worker import STALLED_MARKER, TINY

DIGITS_RUN = {"num_train_steps": 66, "checkpoint_every_steps": 33}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, env):
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, metrics_of(run_worker(workdir, DIGITS_RUN, env=env).stdout)


def test_digits_run_learns_and_writes_records(straight_run):
    workdir, metrics = straight_run
    assert metrics["eval_examples"] == 360
    assert metrics["eval_top1"] > 0.3, metrics  # chance is 0.1
    records = metrics_records(workdir)
    evals = [r for r in records if "eval_top1" in r]
    assert [r["step"] for r in evals] == [44, 66]  # every epoch (44 steps) and at the end
    assert {"step", "epoch", "eval_top1", "eval_top5", "eval_loss", "eval_examples"} <= set(
        evals[-1]
    )
    assert 0.0 <= evals[-1]["eval_top1"] <= evals[-1]["eval_top5"] <= 1.0
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 67))
    assert all(0.0 <= r["data_wait"] <= 1.0 for r in train)  # the input wait is measured
    assert (workdir / "training_curves.png").stat().st_size > 1000
    assert list((workdir / "tensorboard").iterdir())
    assert checkpoint_steps(workdir) == [33, 66]
    _, model_dir = model_variables(workdir)
    assert model_dir.class_names == tuple(str(d) for d in range(10))
    assert model_dir.num_classes == 10 and model_dir.architecture == "dpn68"


def test_resume_after_sigkill_equals_straight_run(straight_run, tmp_path, env):
    reference, _ = straight_run
    killed = run_worker(tmp_path, DIGITS_RUN, "--kill-after-checkpoint", 33, env=env, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint_steps(tmp_path) == [33] and not (tmp_path / "model").exists()
    assert (tmp_path / "train.lock").exists()  # left by the killed run, taken over below
    # A save cut off mid-way (orbax's temporary directory) must be ignored.
    (tmp_path / "checkpoints" / "50.orbax-checkpoint-tmp-123").mkdir()
    run_worker(tmp_path, DIGITS_RUN, env=env)
    assert_same_variables(model_variables(tmp_path)[0], model_variables(reference)[0])
    steps = [r["step"] for r in metrics_records(tmp_path) if "train_loss" in r]
    assert steps == list(range(1, 67))  # each step recorded once, across the kill


def test_damaged_latest_checkpoint_falls_back_to_the_one_before(straight_run, tmp_path, env):
    reference, _ = straight_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "model")
    for file in (workdir / "checkpoints" / "66" / "state").rglob("*"):
        if file.is_file():
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # truncated
    result = run_worker(workdir, DIGITS_RUN, "--print-restored", env=env)
    assert "checkpoint step 66" in result.stderr and "cannot be read" in result.stderr
    assert result.stdout.count("RESTORED 33 ") == 1
    assert (workdir / "checkpoints" / "66.corrupt").is_dir()  # kept for inspection
    assert checkpoint_steps(workdir) == [33, 66]  # trained on from 33 and saved 66 anew
    assert_same_variables(model_variables(workdir)[0], model_variables(reference)[0])


SHORT_RUN = {"num_train_steps": 6, "checkpoint_every_steps": 2}  # checkpoints 2, 4, 6


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, env):
    """A 6-step run on synthetic batches with checkpoints at steps 2, 4 and 6, for damaging."""
    workdir = tmp_path_factory.mktemp("short")
    run_worker(workdir, SHORT_RUN, "--synthetic-data", env=env)
    assert checkpoint_steps(workdir) == [2, 4, 6]
    return workdir


def copy_run(workdir: Path, destination: Path) -> Path:
    shutil.copytree(workdir, destination)
    shutil.rmtree(destination / "model")
    return destination


def flip_array_byte(step: Path) -> None:
    """One flipped byte in the middle of the largest array data file (not an index node)."""
    data = max((step / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x01
    data.write_bytes(bytes(content))


def write_data_state(text: str):
    def damage(step: Path) -> None:
        [data] = (step / "data").iterdir()
        data.write_text(text)

    return damage


DAMAGE = {
    "flipped_byte": flip_array_byte,
    "no_state_metadata": lambda step: (step / "state" / "_METADATA").unlink(),
    "data_state_{}": write_data_state("{}"),
    "data_state_[1,2]": write_data_state("[1, 2]"),
    "cut_checksums": lambda step: (step / "checksums" / "checksums.json").write_text('{"chec'),
}


@pytest.mark.parametrize(
    "damage_6, damage_4",
    [("flipped_byte", "no_state_metadata"), ("data_state_{}", "data_state_[1,2]")],
)
def test_any_damage_to_a_step_sets_it_aside_and_falls_back(
    damage_6, damage_4, short_run, tmp_path, env
):
    """A flipped byte used to be restored silently, a missing _METADATA was "another
    configuration", a data state of the wrong shape a misleading line or a traceback."""
    workdir = copy_run(short_run, tmp_path / "run")
    (workdir / "checkpoints" / "6.corrupt").mkdir()  # set aside by an earlier run: kept
    (workdir / "checkpoints" / "6.corrupt" / "notes.txt").write_text("mine")
    DAMAGE[damage_6](workdir / "checkpoints" / "6")
    DAMAGE[damage_4](workdir / "checkpoints" / "4")
    result = run_worker(workdir, SHORT_RUN, "--synthetic-data", "--print-restored", env=env)
    warnings = [line for line in result.stderr.splitlines() if "cannot be read" in line]
    assert [re.search(r"checkpoint step (\d+) ", line)[1] for line in warnings] == ["6", "4"]
    assert "another model or configuration" not in result.stderr
    if damage_6 == "flipped_byte":
        assert "is not what was saved (checksum mismatch)" in warnings[0]
    assert result.stdout.count("RESTORED 2 ") == 1
    assert (workdir / "checkpoints" / "6.corrupt" / "notes.txt").read_text() == "mine"
    assert (workdir / "checkpoints" / "6.corrupt-2" / "state").is_dir()
    assert (workdir / "checkpoints" / "4.corrupt" / "state").is_dir()
    assert checkpoint_steps(workdir) == [2, 4, 6]  # trained on from 2
    assert_same_variables(model_variables(workdir)[0], model_variables(short_run)[0])


def test_all_checkpoints_damaged_stops_naming_them(short_run, tmp_path, env):
    """Used to start again from step 0, silently, with rc 0."""
    workdir = copy_run(short_run, tmp_path / "run")
    for step, damage in zip((2, 4, 6), ("data_state_{}", "cut_checksums", "flipped_byte")):
        DAMAGE[damage](workdir / "checkpoints" / str(step))
    result = run_worker(workdir, SHORT_RUN, "--synthetic-data", env=env, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    checkpoints = workdir / "checkpoints"
    assert error == (
        f"train_worker: error: no intact checkpoint in {checkpoints}: every step is damaged and "
        f"set aside ({checkpoints}/2.corrupt, {checkpoints}/4.corrupt, {checkpoints}/6.corrupt); "
        "to start over, use another --workdir or move those out of checkpoints/ (dpn_jax "
        "deletes none of them)"
    )
    assert checkpoint_steps(workdir) == []  # nothing trained
    assert not (workdir / "model").exists()


def test_another_configuration_is_refused_and_its_checkpoints_kept(short_run, tmp_path, env):
    workdir = copy_run(short_run, tmp_path / "run")
    other = {**SHORT_RUN, "model_kwargs": {**TINY, "num_init_features": 16}}
    result = run_worker(workdir, other, "--synthetic-data", env=env, check=False)
    assert result.returncode == 1
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "holds checkpoints of another model or configuration" in error
    assert checkpoint_steps(workdir) == [2, 4, 6] and "cannot be read" not in result.stderr


def test_full_disk_ends_with_one_line_and_keeps_earlier_checkpoints(tmp_path, env):
    result = run_worker(
        tmp_path, DIGITS_RUN, "--disk-full-after-checkpoint", 33, env=env, check=False
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr[-3000:]
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert error.startswith("train_worker: error: saving a checkpoint in ")
    assert checkpoint_steps(tmp_path) == [33]  # intact
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.isdigit()]
    assert leftovers == []  # no orbax staging directory left behind


def tiny_train_py_flags(workdir: Path, **overrides) -> list[str]:
    settings = {
        "image_size": 32,
        "batch_size": 32,
        "base_batch_size": 32,
        "eval_batch_size": 40,
        "schedule": "constant",
        "warmup_epochs": 0,
        "learning_rate": 0.05,
        "log_every_steps": 1,
        **overrides,
    }
    return [
        "train.py",
        "--workdir",
        str(workdir),
        *[f"--config.model_kwargs.{k}={v}" for k, v in TINY.items()],
        *[f"--config.{k}={v}" for k, v in settings.items()],
    ]


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 400) -> None:
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert path.exists(), f"{path} never appeared"


def test_sigterm_saves_and_exits_0_and_a_second_run_is_refused(tmp_path, env):
    flags = tiny_train_py_flags(tmp_path, num_train_steps=100000)
    proc = subprocess.Popen(  # as a user starts it: JAX probes for GPUs and TPUs
        [sys.executable, *flags],
        env={name: value for name, value in env.items() if name != "JAX_PLATFORMS"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(tmp_path / "metrics.jsonl", proc)
    second = subprocess.run(
        [sys.executable, *flags], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    [error] = [line for line in second.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert f"is in use by another train.py (pid {proc.pid} on " in error
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    steps = checkpoint_steps(tmp_path)
    assert len(steps) == 1 and 0 < steps[0] < 100000
    assert f"saved step {steps[0]}" in err + out
    assert f"stopped at step {steps[0]} of 100000, resume with the same command" in err + out
    assert "final validation" not in err + out  # it did not finish
    info_lines = [line for line in err.splitlines() if re.match(r"I\d{4} ", line)]
    assert info_lines == []  # absl's INFO records (JAX's backend probing, orbax) stay off screen


def test_sigterm_while_waiting_for_data_saves_and_exits_0(tmp_path, env):
    proc = start_worker(
        tmp_path, {"num_train_steps": 100}, "--synthetic-data", "--stall-data-after", 5, env=env
    )
    wait_for(tmp_path / STALLED_MARKER, proc)
    time.sleep(1)  # the feeder reads ahead: the trainer is now waiting for batch 6
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "while waiting for data: saved step 5" in err + out
    assert checkpoint_steps(tmp_path) == [5]


def test_sigterm_while_a_read_is_stuck_saves_and_exits_within_seconds(tmp_path, env):
    """Reader threads blocked in a read (a FIFO, a hung network filesystem) that never returns
    used to keep the process alive forever after "saved step N"."""
    proc = start_worker(tmp_path, {"num_train_steps": 100}, "--block-reads-after", 200, env=env)
    try:
        wait_for(tmp_path / STALLED_MARKER, proc)
        wait_for(tmp_path / "metrics.jsonl", proc)  # trained on the batches read before
        time.sleep(3)  # every batch read is used: the trainer waits for data
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    [saved] = re.findall(r"while waiting for data: saved step (\d+)", err + out)
    assert checkpoint_steps(tmp_path) == [int(saved)] and int(saved) > 0
    assert "METRICS " in out


def test_nan_fails_naming_the_step_and_is_never_saved(tmp_path, env):
    result = run_worker(
        tmp_path,
        {"num_train_steps": 20, "checkpoint_every_steps": 3},
        "--poison-step",
        5,
        env=env,
        check=False,
    )
    assert result.returncode != 0
    assert "FloatingPointError: loss or gradient became NaN/Inf at step 6 " in result.stderr
    assert checkpoint_steps(tmp_path) == [3]


def test_nan_step_skipped_when_configured(tmp_path, env):
    result = run_worker(
        tmp_path,
        {"num_train_steps": 8, "skip_nonfinite_updates": True},
        "--poison-step",
        2,
        env=env,
    )
    assert np.isfinite(metrics_of(result.stdout)["eval_loss"])
    variables, _ = model_variables(tmp_path)
    assert all(np.isfinite(v).all() for v in flat(variables).values())


def test_finetune_from_converted_checkpoint_with_new_head(tmp_path, env):
    import jax

    from dpn_jax import create_model
    from dpn_jax.data.preprocessing import Preprocessing
    from dpn_jax.weights.model_dir import ModelDir

    _, source = create_model("dpn68", num_classes=7, rng=jax.random.key(42), **TINY)
    source_dir = tmp_path / "converted"
    ModelDir(
        architecture="dpn68",
        num_classes=7,
        model_kwargs=TINY,
        variables=source,
        preprocessing=Preprocessing(
            input_size=(32, 32),
            crop_pct=1.0,
            interpolation="bilinear",
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
        ),
        source="test",
    ).save(source_dir)
    workdir = tmp_path / "run"
    run_worker(
        workdir,
        {"init_from": str(source_dir), "num_train_steps": 1, "model": "dpn92", "model_kwargs": {}},
        env=env,
    )
    tuned, model_dir = model_variables(workdir)
    assert model_dir.num_classes == 10 and model_dir.architecture == "dpn68"
    assert model_dir.preprocessing.mean == (0.5,) * 3  # preprocessing of the source
    assert tuned["params"]["classifier"]["kernel"].shape[-1] == 10
    stem, stem_source = (
        v["params"]["features"]["conv1_1"]["conv"]["kernel"] for v in (tuned, source)
    )
    _, fresh = create_model("dpn68", num_classes=10, rng=jax.random.key(0), **TINY)
    stem_fresh = fresh["params"]["features"]["conv1_1"]["conv"]["kernel"]
    assert np.abs(stem - stem_source).mean() < 0.5 * np.abs(stem - stem_fresh).mean()
