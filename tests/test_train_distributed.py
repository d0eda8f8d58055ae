"""The trainer over several processes and device counts, in subprocesses on simulated CPU devices:
2 processes x 2 devices against 1 process x 4, a stop agreed by every process, and checkpoints
restored onto other device counts.
"""

from __future__ import annotations

import shutil
import signal
import time

import numpy as np
import pytest
from runs import (
    checkpoint_steps,
    flat,
    free_port,
    metrics_of,
    metrics_records,
    model_variables,
    restored_of,
    run_worker,
    start_worker,
    subprocess_env,
)
from train_worker import digest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def start_processes(workdir, overrides, *extra, env, count=2):
    address = f"127.0.0.1:{free_port()}"
    return [
        start_worker(
            workdir,
            overrides,
            "--synthetic-data",
            *extra,
            "--coordinator",
            address,
            "--num-processes",
            count,
            "--process-id",
            i,
            env=env,
        )
        for i in range(count)
    ]


def finish(procs, timeout=600) -> list[tuple[str, str]]:
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return outputs


def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path, cache):
    run = {"num_train_steps": 2}
    single = run_worker(tmp_path / "single", run, "--synthetic-data", env=subprocess_env(cache, 4))
    outputs = finish(start_processes(tmp_path / "multi", run, env=subprocess_env(cache, 2)))
    multi_metrics, single_metrics = metrics_of(outputs[0][0]), metrics_of(single.stdout)
    assert multi_metrics["eval_examples"] == single_metrics["eval_examples"] == 360
    assert multi_metrics["eval_top1"] == pytest.approx(single_metrics["eval_top1"], abs=1e-6)
    multi_vars, _ = model_variables(tmp_path / "multi")
    single_vars, _ = model_variables(tmp_path / "single")
    # gloo and the in-process all-reduce sum in different orders; the stem's BatchNorm bias
    # gradient cancels to ~1e-3 of its terms, so its rounding shows at ~1e-5 after an update.
    for name, value in flat(single_vars).items():
        np.testing.assert_allclose(
            flat(multi_vars)[name], value, rtol=1e-5, atol=3e-5, err_msg=name
        )


def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path, cache):
    procs = start_processes(tmp_path, {"num_train_steps": 100000}, env=subprocess_env(cache, 2))
    deadline = time.time() + 400
    while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    while len(metrics_records(tmp_path)) < 3 and time.time() < deadline:
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # only the second host is told
    outputs = finish(procs, timeout=300)
    steps = checkpoint_steps(tmp_path)
    assert len(steps) == 1, steps
    saved = [f"saved step {steps[0]} " for _ in outputs]
    assert all(text in out + err for text, (out, err) in zip(saved, outputs)), outputs
    logged = max(r["step"] for r in metrics_records(tmp_path))
    assert steps[0] - logged <= 2  # agreed within a step or two of the signal, not at a log step


@pytest.fixture(scope="module")
def four_device_checkpoint(tmp_path_factory, cache):
    """A 2-step run on 4 devices: checkpoint 2, and its parameters exported to WORKDIR/model."""
    workdir = tmp_path_factory.mktemp("four_devices")
    run_worker(workdir, {"num_train_steps": 2}, "--synthetic-data", env=subprocess_env(cache, 4))
    return workdir


@pytest.mark.parametrize("devices", [2, 1])
def test_checkpoint_of_four_devices_resumes_on_fewer(
    devices, four_device_checkpoint, tmp_path, cache
):
    workdir = tmp_path / "resumed"
    shutil.copytree(four_device_checkpoint, workdir)
    saved, _ = model_variables(four_device_checkpoint)
    resumed = run_worker(
        workdir,
        {"num_train_steps": 4},
        "--synthetic-data",
        "--print-restored",
        env=subprocess_env(cache, devices),
    )
    assert restored_of(resumed.stdout) == (2, digest(saved["params"]))  # bit for bit
    assert checkpoint_steps(workdir) == [2, 4]  # and training went on
    trained, _ = model_variables(workdir)
    assert not np.array_equal(
        flat(trained)["params/classifier/kernel"], flat(saved)["params/classifier/kernel"]
    )
    assert metrics_of(resumed.stdout)["eval_examples"] == 360
