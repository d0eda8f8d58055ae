"""The same command gives the same run, bit for bit, on CPU: twice in a row, across a SIGKILL and
across a SIGTERM.

On one device (the default configuration) and on four simulated devices; every number of the
run (weights, BatchNorm statistics, losses) must be identical, not just close.
"""

from __future__ import annotations

import signal
import time

import pytest
from runs import (
    assert_same_variables,
    checkpoint_steps,
    metrics_records,
    model_variables,
    run_worker,
    start_worker,
    subprocess_env,
)
from train_worker import STALLED_MARKER

RUN = {"num_train_steps": 12, "checkpoint_every_steps": 6}

pytestmark = pytest.mark.slow


def losses(workdir) -> list[float]:
    return [r["train_loss"] for r in metrics_records(workdir) if "train_loss" in r]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.mark.parametrize("devices", [1, 4])
def test_same_command_twice_and_across_a_sigkill_is_bit_identical(devices, tmp_path, cache):
    env = subprocess_env(cache, devices)
    first, second, killed = tmp_path / "first", tmp_path / "second", tmp_path / "killed"
    run_worker(first, RUN, env=env)
    run_worker(second, RUN, env=env)
    assert losses(first) == losses(second)
    assert_same_variables(model_variables(first)[0], model_variables(second)[0])

    result = run_worker(killed, RUN, "--kill-after-checkpoint", 6, env=env, check=False)
    assert result.returncode == -signal.SIGKILL and checkpoint_steps(killed) == [6]
    run_worker(killed, RUN, env=env)
    assert losses(killed) == losses(first)
    assert_same_variables(model_variables(killed)[0], model_variables(first)[0])


def test_sigterm_and_resume_is_bit_identical_on_1_device(tmp_path, cache):
    """Stopped by SIGTERM at step 4 (between checkpoints), then resumed to the end."""
    env = subprocess_env(cache, 1)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_worker(straight, RUN, env=env)
    proc = start_worker(stopped, RUN, "--stall-data-after", 4, env=env)
    deadline = time.time() + 300
    while not (stopped / STALLED_MARKER).exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and checkpoint_steps(stopped) == [4], err[-2000:]
    run_worker(stopped, RUN, env=env)
    assert losses(stopped) == losses(straight)
    assert_same_variables(model_variables(stopped)[0], model_variables(straight)[0])
