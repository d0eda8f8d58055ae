"""Helpers for the tests that run the trainer in subprocesses (tests/train_worker.py, train.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "train_worker.py"


def subprocess_env(cache_dir: str | os.PathLike, devices: int = 4) -> dict[str, str]:
    """CPU with `devices` simulated devices; one persistent compilation cache for every run."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        DPN_JAX_COMPILATION_CACHE=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=str(ROOT),
    )


def wait_until_catching(proc: subprocess.Popen, signum: int, seconds: float = 120) -> None:
    """Until `proc` has a handler for `signum` (Linux's SigCgt mask): Python itself catches only
    SIGINT, so SIGTERM's bit says dpn_jax's handler (hold_interrupts) is installed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        [mask] = [line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")]
        if int(mask, 16) >> (signum - 1) & 1:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {proc.pid} never caught signal {signum}")


def worker_command(workdir, overrides: dict, *extra) -> list[str]:
    return [sys.executable, str(WORKER), str(workdir), json.dumps(overrides), *map(str, extra)]


def run_worker(workdir, overrides: dict, *extra, env: dict, check: bool = True, **kwargs):
    result = subprocess.run(
        worker_command(workdir, overrides, *extra),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def start_worker(workdir, overrides: dict, *extra, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        worker_command(workdir, overrides, *extra),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def metrics_of(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("METRICS "))
    return json.loads(line[len("METRICS ") :])


def restored_of(output: str) -> tuple[int, str]:
    """(step, parameter digest) that a `--print-restored` worker resumed from."""
    line = next(line for line in output.splitlines() if line.startswith("RESTORED "))
    step, digest = line.split()[1:]
    return int(step), digest


def model_variables(workdir):
    """(variables, ModelDir) of the model a run exported to WORKDIR/model."""
    from dpn_jax.weights.model_dir import ModelDir

    model_dir = ModelDir.load(Path(workdir) / "model")
    return model_dir.variables, model_dir


def flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def assert_same_variables(a, b) -> None:
    """Bit for bit."""
    flat_a, flat_b = flat(a), flat(b)
    assert flat_a.keys() == flat_b.keys()
    for name, value in flat_b.items():
        np.testing.assert_array_equal(flat_a[name], value, err_msg=name)


def checkpoint_steps(workdir) -> list[int]:
    return sorted(
        int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()
    )


def metrics_records(workdir) -> list[dict]:
    with open(Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
