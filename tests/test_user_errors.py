"""Every mistake a user can make is a `DpnJaxError`: one line, no traceback (issue 28)."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import ROOT, subprocess_env
from train_worker import TINY

from dpn_jax.data.batch_augment import Mixup
from dpn_jax.data.labels import class_names
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.errors import ConfigError, DpnJaxError, WeightsError
from dpn_jax.factory import create_model
from dpn_jax.models.layers import Conv2d, get_act
from dpn_jax.ops.conv import conv_lowering
from dpn_jax.train.state import merge_for_finetuning
from dpn_jax.weights.model_dir import ModelDir


def test_unknown_activation_and_indivisible_groups():
    with pytest.raises(ConfigError, match=r"unknown activation 'relu6'; choose from \['elu'"):
        get_act("relu6")
    conv = Conv2d(features=4, kernel_size=3, groups=2)
    with pytest.raises(ConfigError, match="3 input channels not divisible by groups=2"):
        conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_unknown_conv_lowering():
    with pytest.raises(ConfigError, match="unknown conv lowering 'fast'"):
        with conv_lowering("fast"):
            pass


def test_class_names_of_another_head():
    with pytest.raises(WeightsError, match="2 class names for a 3-class head"):
        class_names(3, ["cat", "dog"])


def test_mixup_of_an_odd_batch():
    with pytest.raises(ConfigError, match="mixup needs an even number of rows per device, got 3"):
        Mixup(num_classes=4)(jax.random.key(0), jnp.zeros((3, 8, 8, 3)), jnp.zeros(3, jnp.int32))


def test_finetuning_from_weights_of_another_architecture():
    fresh = {
        "params": {"conv": {"kernel": np.zeros((3, 3, 3, 8))}, "classifier": {"b": np.ones(2)}}
    }
    with pytest.raises(WeightsError, match="^src: no tensor params/conv/kernel"):
        merge_for_finetuning(fresh, {"params": {"classifier": {"b": np.ones(2)}}}, "src")
    loaded = {
        "params": {"conv": {"kernel": np.zeros((3, 3, 3, 4))}, "classifier": {"b": np.ones(2)}}
    }
    with pytest.raises(WeightsError, match="tensor params/conv/kernel has shape .3, 3, 3, 4."):
        merge_for_finetuning(fresh, loaded, "src")
    assert issubclass(WeightsError, DpnJaxError)


def test_train_py_init_from_with_other_model_kwargs_is_one_line(tmp_path):
    """`--config.init_from=DIR` with model_kwargs that change a tensor's shape: it was a
    traceback (a plain ValueError from merge_for_finetuning)."""
    _, variables = create_model("dpn68", num_classes=3, rng=jax.random.key(0), **TINY)
    source = tmp_path / "source"
    preprocessing = Preprocessing(
        input_size=(32, 32),
        crop_pct=1.0,
        interpolation="bilinear",
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    ModelDir(
        architecture="dpn68",
        num_classes=3,
        model_kwargs=TINY,
        variables=variables,
        preprocessing=preprocessing,
        source="test",
    ).save(source)
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--workdir",
            str(tmp_path / "run"),
            f"--config.init_from={source}",
            "--config.model_kwargs.inc_sec=(8,8,8,8)",  # the source has (4, 4, 4, 4)
            "--config.image_size=32",
        ],
        env=subprocess_env(tmp_path / "cache", devices=1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert f"train.py: error: {source}: tensor " in error
    assert "has shape" in error and "the model expects" in error
