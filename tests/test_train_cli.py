"""train.py at its edges: mistyped keys, --help, interrupts before training, and the lines a run
prints (what it trains, where it resumed, how it ended) - issue 24, items 7, 10-15, 17."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import tqdm
from runs import ROOT, subprocess_env, wait_until_catching

from configs import default
from dpn_jax.cli.common import report_error
from dpn_jax.errors import printable
from dpn_jax.models.dpn import MODEL_CONFIGS
from dpn_jax.train import report
from dpn_jax.train.config import DEMO_ARCHITECTURE, DEMO_MODEL_KWARGS, architecture


def train_py(tmp_path, *flags, timeout=120):
    return subprocess.run(
        [sys.executable, "train.py", "--workdir", str(tmp_path / "run"), *flags],
        env=subprocess_env(tmp_path / "cache"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--config.learnig_rate=0.1"],
            "--config.learnig_rate: no such key (did you mean --config.learning_rate?)",
        ),
        (
            ["--config.model_kwargs.k_sek=(1,1,1,1)"],
            "--config.model_kwargs.k_sek: no such key (did you mean --config.model_kwargs.k_sec?)",
        ),
        (["--config.model_kwargs.bogus=1"], "--config.model_kwargs.bogus: no such key"),
        (  # a config file given on the command line: the overrides are applied later
            ["--config", "configs/imagenet.py:dpn92", "--config.batchsize=8"],
            "--config.batchsize: no such key (did you mean --config.batch_size?)",
        ),
        (["--config.num_epochs=1e308"], "--config.num_epochs=1e+308: must be a number in [0, "),
    ],
)
def test_a_mistyped_key_or_absurd_value_is_one_line_before_any_work(tmp_path, flags, message):
    result = train_py(tmp_path, *flags)
    assert result.returncode == 1
    assert result.stderr.startswith(f"train.py: error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "run").exists()  # no workdir, no lock taken


def test_help_lists_the_config_keys_with_defaults_and_meanings(tmp_path):
    result = train_py(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "  --config.batch_size=64  global, over all devices and processes" in lines
    assert "  --config.model_kwargs.k_sec=None  blocks per stage" in lines
    for key in default.get_config():
        assert any(line.startswith(f"  --config.{key}") for line in lines), key


def test_the_demo_shrinkage_belongs_to_the_demo():
    assert architecture(default.get_config()) == (DEMO_ARCHITECTURE, DEMO_MODEL_KWARGS)
    config = default.get_config()
    config.model = "dpn92"
    assert architecture(config) == ("dpn92", {})  # timm's dpn92, not a tiny one
    config.model_kwargs.k_r = 64
    assert architecture(config) == ("dpn92", {"k_r": 64})
    assert MODEL_CONFIGS["dpn92"].replace(k_r=64).k_sec == (3, 4, 20, 3)


@pytest.mark.parametrize("delay_s", [0.0, 0.3, 2.0])  # defining the flags, importing JAX, after
def test_sigint_before_training_is_one_line_and_leaves_no_traceback(tmp_path, delay_s):
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--workdir", str(tmp_path / "run")],
        env=subprocess_env(tmp_path / "cache"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_catching(proc, signal.SIGTERM)  # train.py's first lines ran
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert err.strip().splitlines()[-1] == (
        "train.py: interrupted before training started, nothing saved"
    ), err
    assert "Traceback" not in err


def test_error_lines_escape_control_characters_and_cut_long_user_data(tmp_path, capsys):
    report_error("train.py", "class 'a\x1b]0;owned\x07' " + "x" * 10_000_000)
    err = capsys.readouterr().err
    assert "\x1b" not in err and "a\\x1b]0;owned\\x07" in err
    assert len(err) < 3000 and "more characters)" in err and err.count("\n") == 1
    assert printable("abc", 2) == "ab... (1 more characters)"


def test_a_one_class_folder_named_with_controls_is_reported_escaped(tmp_path):
    from PIL import Image

    hostile = "cat\x1b]0;owned\x07"
    for split in ("train", "val"):
        (tmp_path / "data" / split / hostile).mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(tmp_path / "data" / split / hostile / "a.png")
    result = train_py(tmp_path, f"--config.dataset=folder:{tmp_path / 'data'}", timeout=300)
    assert result.returncode == 1, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "cat\\x1b]0;owned\\x07" in line and "\x1b" not in result.stderr


def test_the_eta_is_not_computed_from_the_compiling_step():
    with tqdm.tqdm(total=1000, smoothing=0, disable=False, file=open("/dev/null", "w")) as bar:
        time.sleep(0.3)  # the first step compiles
        report.restart_eta(bar, 1)
        bar.update(1)
        assert bar.format_dict["rate"] is None and "?" in str(bar)  # not hours
        time.sleep(0.05)
        bar.update(1)
        remaining = (1000 - 2) / (1 / (time.time() - bar.start_t))
        assert remaining < 200  # 998 steps at ~20 steps/s, not 998 at 1 step / 0.35 s


@pytest.mark.slow
def test_a_run_says_what_it_trains_where_it_resumed_and_where_the_model_is(tmp_path):
    from test_train_runs import tiny_train_py_flags

    def run(steps):
        flags = tiny_train_py_flags(tmp_path / "run", num_train_steps=steps)
        result = subprocess.run(
            [sys.executable, *flags],
            env=subprocess_env(tmp_path / "cache"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return [line for line in result.stdout.splitlines() if line.strip()]

    model = tmp_path / "run" / "model"
    first = run(4)
    assert first[0].startswith("training dpn68 (groups=2, inc_sec=(4, 4, 4, 4), k_r=16, ")
    assert (
        "M params, on digits (1437 train / 360 eval images, 10 classes), 4 cpu devices"
        in (first[0])
    )
    assert first[-1].startswith("final validation top-1 (raw weights, exported): ")
    assert first[-1].endswith(f"model saved to {model} (dpn-predict --checkpoint {model} IMAGE)")
    again = run(4)  # finished: the result again, not only a full bar
    assert again[1] == f"resuming from step 4 of 4 ({tmp_path / 'run' / 'checkpoints' / '4'})"
    assert again[-1] == first[-1]
    fewer = run(2)
    assert fewer[-1] == (
        f"{tmp_path / 'run'} already holds step 4, past the 2 steps this config asks for: "
        f"nothing trained (the model of step 4 is in {model})"
    )


def test_a_failed_start_up_check_leaves_no_workdir_behind(tmp_path):
    result = train_py(tmp_path, "--config.batch_size=4096")  # more than the 1437 digits
    assert result.returncode == 1 and "exceeds the 1437 training examples" in result.stderr
    assert not (tmp_path / "run").exists()  # it was created for this run: no train.lock left


def test_a_failed_start_up_check_keeps_an_existing_workdir(tmp_path):
    (tmp_path / "run").mkdir()
    result = train_py(tmp_path, "--config.batch_size=4096")
    assert result.returncode == 1
    assert (tmp_path / "run").is_dir()  # not ours to remove
