"""The same command gives the same run, bit for bit, on CPU: twice in a row, and across a SIGKILL.

On one device (the default configuration) and on four simulated devices; every number of the
run (weights, BatchNorm statistics, losses) must be identical, not just close.
"""
from __future__ import annotations

import signal

import pytest

from runs import (assert_same_variables, checkpoint_steps, metrics_records, model_variables,
                  run_worker, subprocess_env)

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
