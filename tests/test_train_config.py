"""Bad training settings: one line naming the key, before any data is read or anything compiles."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from runs import ROOT, subprocess_env

from configs import default
from dpn_jax.errors import ConfigError, DataError
from dpn_jax.train.config import validate_config
from dpn_jax.train.trainer import train_and_evaluate


def config_with(**overrides):
    config = default.get_config()
    config.update(overrides)
    return config


def test_the_shipped_configs_are_valid():
    from configs import finetune, imagenet, ra

    validate_config(default.get_config())
    validate_config(ra.get_config("dpn68b"))
    validate_config(imagenet.get_config("dpn131"))
    validate_config(config_with(**{**finetune.get_config().to_dict(), "init_from": "some/dir"}))


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("batch_size", 0, "a positive integer"),
        ("batch_size", -3, "a positive integer"),
        ("eval_batch_size", 0, "a positive integer"),
        ("checkpoint_every_steps", 0, "a positive integer"),
        ("log_every_steps", 0, "a positive integer"),
        ("grad_accum_steps", 0, "a positive integer"),
        ("keep_checkpoints", 0, "a positive integer"),
        ("learning_rate", -1.0, "a number in (0, inf)"),
        ("learning_rate", 0.0, "a number in (0, inf)"),
        ("momentum", 1.0, "a number in [0, 1)"),
        ("smoothing", -0.1, "a number in [0, 1)"),
        ("ema_decay", 1.0, "a number in [0, 1)"),
        ("drop_rate", 1.5, "a number in [0, 1)"),
        ("crop_pct", 1e-300, "unset or a number in [0.25, 1]"),
        ("std", (0.2, 1e-300, 0.2), "unset or three numbers >= 0.001"),
        ("image_size", 8, "an integer in [32, 4096]"),
        ("image_size", 10**9, "an integer in [32, 4096]"),
        ("dtype", "float16", "one of 'float32', 'bfloat16', 'float64'"),
        ("parallelism", "ddp", "one of 'shard_map', 'pmap'"),
        ("schedule", "linear", "one of 'cosine', 'step', 'multistep', 'constant'"),
        ("opt", "adam", "one of 'sgd', 'nesterov', 'momentum', 'adamw', 'lamb', 'rmsproptf'"),
        ("opt_betas", (0.9, 1.0), "unset or two numbers in [0, 1)"),
        ("clip_grad", 0.0, "unset or a number in (0, inf)"),
        ("clip_mode", "agc2", "one of 'norm', 'value', 'agc'"),
        ("decay_rate", 0.0, "a number in (0, inf)"),
        ("bce_target_thresh", 1.0, "unset or a number in [0, 1)"),
        ("interpolation", "cubic", "unset or one of"),
        ("weight_decay_pattern", "(unclosed", "a regular expression"),
    ],
)
def test_each_rule_names_key_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as raised:
        validate_config(config_with(**{key: value}))
    message = str(raised.value)
    assert message.startswith(f"--config.{key}={value!r}: must be ") and allowed in message
    assert "\n" not in message


def test_an_untyped_config_gets_the_same_rules():
    """A config file that builds its ConfigDict from a plain dict has no field types to refuse
    a string where a bool belongs: the rules do."""
    import ml_collections

    config = ml_collections.ConfigDict({**default.get_config().to_dict(), "reduced_decode": "no"})
    with pytest.raises(ConfigError, match=r"^--config.reduced_decode='no': must be True or False$"):
        validate_config(config)


def test_unknown_model_and_model_kwargs_are_named():
    with pytest.raises(ConfigError, match="model='dpn69': must be 'demo' or one of dpn48b"):
        validate_config(config_with(model="dpn69"))
    config = config_with()
    config.model_kwargs.update(k_sek=(1, 1, 1, 1))
    with pytest.raises(ConfigError, match="--config.model_kwargs.k_sek: not an architecture field"):
        validate_config(config)


def test_a_run_of_no_steps_is_refused():
    with pytest.raises(ConfigError, match="nothing to train"):
        validate_config(config_with(num_epochs=0.0))
    validate_config(config_with(num_epochs=0.0, num_train_steps=5))


def test_batch_sizes_must_divide_over_the_devices_before_data_is_read(tmp_path):
    """4 simulated devices (tests/conftest.py); the dataset does not even exist."""
    for key in ("batch_size", "eval_batch_size"):
        config = config_with(**{key: 126, "dataset": f"folder:{tmp_path / 'missing'}"})
        with pytest.raises(
            ConfigError, match=f"--config.{key}=126 must be a positive multiple of the 4 devices"
        ):
            train_and_evaluate(config, tmp_path / "run")


def test_a_one_class_dataset_is_refused(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "data" / split / "only").mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(tmp_path / "data" / split / "only" / "a.png")
    config = config_with(dataset=f"folder:{tmp_path / 'data'}", batch_size=4, eval_batch_size=4)
    with pytest.raises(DataError, match="has 1 class .*needs at least 2"):
        train_and_evaluate(config, tmp_path / "run")


@pytest.mark.parametrize(
    "flag, key",
    [
        ("--config.batch_size=0", "batch_size"),
        ("--config.num_epochs=0", None),
        ("--config.learning_rate=-1", "learning_rate"),
        ("--config.reduced_decode=maybe", "reduced_decode"),
    ],
)
def test_train_py_prints_one_line_and_does_no_work(flag, key, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--workdir", str(tmp_path / "run"), flag],
        env=subprocess_env(tmp_path / "cache"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("train.py: error: ") and result.stderr.count("\n") == 1, (
        result.stderr
    )
    assert key is None or f"--config.{key}=" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_read_only_workdir_is_one_line_before_any_work(tmp_path, monkeypatch):
    import os

    from dpn_jax.errors import OutputError

    (tmp_path / "run").mkdir()
    read_only = str(tmp_path / "run")  # as for a non-root user after chmod a-w (root may write)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: str(path) != read_only and real_access(path, mode)
    )
    with pytest.raises(OutputError, match=f"cannot write in the workdir {read_only}: permission"):
        train_and_evaluate(config_with(), tmp_path / "run")
    assert os.listdir(read_only) == []  # no lock file, nothing else


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"opt": "sgd", "momentum": 0.0},
            "--config.opt=sgd (Nesterov) needs --config.momentum > 0",
        ),
        ({"dtype": "float64"}, "--config.dtype=float64 needs JAX_ENABLE_X64=1"),
    ],
)
def test_combinations_the_optimizer_and_dtype_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config_with(**overrides))


def test_the_step_and_the_optimizer_get_settings_derived_once_not_the_config():
    """`train_settings` reads the config at set-up; step.py and optim.py never see it."""
    import inspect

    from dpn_jax.train import optim, step
    from dpn_jax.train.config import train_settings

    for module in (step, optim):
        assert "ml_collections" not in inspect.getsource(module), module.__name__
    config = config_with(
        num_epochs=3.0,
        cooldown_epochs=1.0,
        batch_size=32,
        base_batch_size=64,
        grad_accum_steps=2,
        mixup=0.2,
        smoothing=0.1,
        reprob=0.25,
        ema_decay=0.99,
    )
    settings = train_settings(config, steps_per_epoch=10, num_classes=7)
    assert settings.length.total_steps == 40 and settings.length.total_updates == 20
    assert settings.schedule.lr == pytest.approx(0.1) and settings.schedule.updates_per_epoch == 5
    assert settings.optimizer.grad_accum_steps == settings.step.grad_accum_steps == 2
    assert settings.step.mixup.num_classes == 7 and settings.step.mixup.label_smoothing == 0.1
    assert settings.step.erasing.probability == 0.25 and settings.step.ema_decay == 0.99
