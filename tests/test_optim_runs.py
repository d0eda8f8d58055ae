"""Whole train.py runs for the schedule and the EMA: what the user sees at the end of a run.

The demo (`python train.py --config.num_train_steps=20`) ends its cosine at min_lr on its last
step; a resumed run with another run length is refused; an EMA run's last line is the accuracy
dpn-evaluate finds on the exported model.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from runs import ROOT, metrics_records, subprocess_env
from train_worker import TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(tmp_path_factory.mktemp("jax_cache"))


def train_py(workdir, *flags, env):
    return subprocess.run(
        [sys.executable, "train.py", "--workdir", str(workdir), *flags],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_demo_of_20_steps_ends_its_cosine_at_min_lr_and_refuses_another_length(tmp_path, env):
    run = train_py(tmp_path, "--config.num_train_steps=20", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    lr = {r["step"]: r["lr"] for r in metrics_records(tmp_path) if "lr" in r}
    assert sorted(lr) == [10, 20]
    assert lr[10] > 0.01 and lr[20] == 0.0  # default min_lr, reached at the last step
    assert "final validation top-1 (raw weights, exported): " in run.stdout.splitlines()[-1]

    longer = train_py(tmp_path, "--config.num_train_steps=30", env=env)
    assert longer.returncode == 1 and "Traceback" not in longer.stderr, longer.stderr[-3000:]
    [error] = [line for line in longer.stderr.splitlines() if line.startswith("train.py: error")]
    assert "holds a run with another LR schedule" in error
    assert "run length 20 steps there, 30 now" in error


def test_ema_run_prints_the_accuracy_of_the_exported_model(tmp_path, env):
    run = train_py(
        tmp_path,
        *[f"--config.model_kwargs.{k}={v}" for k, v in TINY.items()],
        "--config.num_train_steps=30",
        "--config.batch_size=32",
        "--config.eval_batch_size=40",
        "--config.ema_decay=0.999",
        "--config.ema_warmup=True",
        "--config.warmup_epochs=0",
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    *_, raw_line, final = run.stdout.splitlines()
    assert raw_line.startswith("raw weights top-1: ") and "(not exported)" in raw_line
    printed = re.match(r"final validation top-1 \(EMA weights, exported\): ([\d.]+)%", final)
    assert printed, final
    evaluated = subprocess.run(
        [sys.executable, "-m", "dpn_jax.cli.evaluate", "--checkpoint", str(tmp_path / "model")]
        + ["--dataset", "digits", "--batch-size", "40", "--json", "--no-progress"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    top1 = json.loads(evaluated.stdout)["top1"]
    assert float(printed.group(1)) == pytest.approx(100 * top1, abs=0.006)
    records = [r for r in metrics_records(tmp_path) if "eval_top1_ema" in r]
    assert records[-1]["eval_top1_ema"] == pytest.approx(top1, abs=1e-6)


def test_ra_recipe_runs_with_every_ingredient_on(tmp_path, env):
    """configs/ra.py (RandAugment, erasing, Nesterov SGD, AGC, per-epoch step LR with warm-up,
    smoothing, EMA) plus mixup/cutmix and the BCE loss, shrunk to a tiny DPN on digits."""
    tiny_ra = tmp_path / "tiny_ra.py"  # the recipe with the tests' tiny DPN (new keys)
    tiny_ra.write_text(
        "import ml_collections\nfrom configs import ra\n\n\ndef get_config(variant):\n"
        "    config = ra.get_config(variant)\n"
        f"    config.model_kwargs = ml_collections.ConfigDict({TINY!r})\n"
        "    return config\n"
    )
    run = train_py(
        tmp_path / "run",
        "--config",
        f"{tiny_ra}:dpn68b",
        "--config.dataset=digits",
        "--config.image_size=32",
        "--config.num_train_steps=50",
        "--config.batch_size=32",
        "--config.eval_batch_size=40",
        "--config.mixup=0.2",
        "--config.cutmix=1.0",
        "--config.bce_loss=True",
        "--config.data_workers=0",
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records = metrics_records(tmp_path / "run")
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses and all(map(np.isfinite, losses))
    assert "final validation top-1 (EMA weights, exported): " in run.stdout.splitlines()[-1]
