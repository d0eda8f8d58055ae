"""One model value and one loader: `load_model` reads a directory, a pretrained tag or a hub id;
`Preprocessing.resolve` is timm's `resolve_data_config`; a model that does not fit is one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import timm
import timm.data

import dpn_jax
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.errors import ConfigError, WeightsError
from dpn_jax.models.dpn import PRETRAINED_CFGS
from dpn_jax.weights.model_dir import ModelDir

TINY = {"k_sec": (1, 1, 1, 1), "groups": 4}
TAG = "dpn68.mx_in1k"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    _, variables = dpn_jax.create_model("dpn68", num_classes=10, rng=jax.random.key(1), **TINY)
    return ModelDir(
        architecture="dpn68",
        num_classes=10,
        model_kwargs=TINY,
        variables=jax.device_get(variables),
        preprocessing=Preprocessing.of_model(TAG),
        source="test",
    ).save(tmp_path_factory.mktemp("saved") / "model")


@pytest.mark.parametrize("tag", sorted(PRETRAINED_CFGS))
@pytest.mark.parametrize("use_test_size", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"img_size": 64}, {"crop_pct": 0.5}])
def test_resolve_is_timms_resolve_data_config(tag, use_test_size, overrides):
    timm_cfg = timm.models.get_pretrained_cfg(tag).to_dict()
    expected = timm.data.resolve_data_config(
        overrides, pretrained_cfg=timm_cfg, use_test_size=use_test_size
    )
    resolved = Preprocessing.of_model(tag).resolve(use_test_size=use_test_size, **overrides)
    assert resolved.input_size == tuple(expected["input_size"][1:])
    assert resolved.crop_pct == pytest.approx(expected["crop_pct"])
    assert resolved.interpolation == expected["interpolation"]
    assert resolved.mean == pytest.approx(expected["mean"])
    assert resolved.std == pytest.approx(expected["std"])
    assert (resolved.test_input_size, resolved.test_crop_pct) == (None, None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"img_size": 16}, "img_size must be an integer in [32, 4096], got 16"),
        ({"img_size": 10**6}, "img_size must be an integer in [32, 4096]"),
        ({"crop_pct": 1.5}, "crop_pct must be a number in [0.25, 1], got 1.5"),
        ({"crop_pct": 0.01}, "crop_pct must be a number in [0.25, 1], got 0.01"),
    ],
)
def test_overrides_are_checked_where_the_stored_values_are(overrides, message):
    with pytest.raises(ConfigError, match=r"^" + message.replace("[", r"\[")):
        Preprocessing.of_model(TAG).resolve(**overrides)
    with pytest.raises(ConfigError, match="--crop-pct must" if "crop_pct" in overrides else "img"):
        Preprocessing.check_overrides(**overrides, names={"crop_pct": "--crop-pct"})


def test_a_non_square_size_needs_an_image_size():
    wide = Preprocessing((224, 320), 0.9, "bicubic", (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError, match=r"non-square input_size \(224, 320\)"):
        wide.resolve()
    assert wide.resolve(img_size=256).image_size == 256


def test_load_model_reads_a_directory_a_tag_and_a_hub_id(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("DPN_JAX_WEIGHTS_CACHE", str(tmp_path / "cache"))
    shutil.copytree(saved, tmp_path / "cache" / TAG)  # as if converted from timm's weights
    expected = ModelDir.load(saved)
    for source in (
        saved,
        str(saved),
        TAG,
        "dpn68",  # the architecture's default tag
        f"hf-hub:timm/{TAG}",
        f"timm/{TAG}",
    ):
        model = dpn_jax.load_model(source)
        assert model == expected, source
        jax.tree.map(np.testing.assert_array_equal, model.variables, expected.variables)


def test_load_model_names_what_it_could_not_read(tmp_path):
    with pytest.raises(WeightsError, match="dpn69: no such model directory, and not a pretrained"):
        dpn_jax.load_model("dpn69")
    (tmp_path / "folder").mkdir()
    with pytest.raises(WeightsError, match="is not a dpn_jax model directory"):
        dpn_jax.load_model(tmp_path / "folder")
    with pytest.raises(WeightsError, match="no such model directory"):
        dpn_jax.load_model(tmp_path / "dpn68")  # a Path is a directory, never a tag


def test_a_predictor_from_a_model_uses_its_preprocessing_and_labels(saved):
    predictor = dpn_jax.Predictor.load(saved, use_test_size=False)
    assert predictor.preprocessing == Preprocessing.of_model(TAG).resolve()
    assert predictor.model.config == ModelDir.load(saved).config
    assert predictor.class_names is None  # 10 classes without names: indices


def test_an_init_from_that_does_not_fit_is_one_line(saved, tmp_path):
    from test_train_cli import train_py

    result = train_py(
        tmp_path, f"--config.init_from={saved}", "--config.model_kwargs.k_sec=(1,1,2,1)"
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"train.py: error: {saved}: no tensor "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
