"""The model directory contract (`ModelDir`): round trip, directories of earlier dpn_jax versions,
one-line errors naming the file and the key, and file text printed escaped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import dpn_jax
from dpn_jax.cli import predict as predict_cli
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.errors import WeightsError
from dpn_jax.weights.model_dir import FORMAT_VERSION, METADATA_FILE, ModelDir

ARCH = "dpn68"
TINY = {"k_sec": (1, 1, 1, 1), "groups": 4}
CLASSES = ("cat", "dog", "fish")
HOSTILE = "\x1b]0;owned\x07"  # an OSC sequence: retitles a terminal that prints it raw


@pytest.fixture(scope="module")
def variables():
    return jax.device_get(dpn_jax.create_model(ARCH, num_classes=len(CLASSES), **TINY)[1])


def model_dir(variables, **changes) -> ModelDir:
    fields = {
        "architecture": ARCH,
        "num_classes": len(CLASSES),
        "model_kwargs": TINY,
        "preprocessing": Preprocessing.from_cfg(dpn_jax.pretrained_cfg(ARCH)),
        "class_names": CLASSES,
        "source": "test",
        "variables": variables,
    }
    return ModelDir(**{**fields, **changes})


@pytest.fixture(scope="module")
def saved(variables, tmp_path_factory) -> Path:
    return model_dir(variables).save(tmp_path_factory.mktemp("saved") / "model")


def copy_with_metadata(saved: Path, destination: Path, change) -> Path:
    """A copy of `saved` whose metadata.json is `change(dict)` (a dict, or text as written)."""
    shutil.copytree(saved, destination)
    metadata = json.loads((saved / METADATA_FILE).read_text())
    changed = change(metadata)
    changed = metadata if changed is None else changed
    (destination / METADATA_FILE).write_text(
        changed if isinstance(changed, str) else json.dumps(changed)
    )
    return destination


def test_round_trip(variables, saved):
    loaded = ModelDir.load(saved)
    assert loaded == model_dir(variables)  # every field but the variables (compared below)
    for (path, value), expected in zip(
        jax.tree_util.tree_flatten_with_path(loaded.variables)[0],
        jax.tree_util.tree_leaves(variables),
    ):
        np.testing.assert_array_equal(value, expected, err_msg=jax.tree_util.keystr(path))
    on_disk = json.loads((saved / METADATA_FILE).read_text())
    assert on_disk["format_version"] == FORMAT_VERSION == loaded.format_version
    assert on_disk["model_kwargs"] == {"k_sec": [1, 1, 1, 1], "groups": 4}
    assert on_disk["preprocessing"]["mean"] == list(dpn_jax.pretrained_cfg(ARCH)["mean"])
    assert loaded.config == dpn_jax.MODEL_CONFIGS[ARCH].replace(**TINY)
    assert loaded.build_model(num_classes=0).num_classes == 0
    assert loaded.build_model().config == loaded.config


def test_model_kwargs_are_kept_as_the_differences_from_the_variant(variables):
    redundant = model_dir(variables, model_kwargs={**TINY, "k_r": 128, "small": True})
    assert redundant.model_kwargs == TINY


def test_directory_of_dpn_jax_0_1_loads_and_is_replaceable(variables, saved, tmp_path):
    """What dpn_jax 0.1.0 wrote: no format_version, preprocessing under `pretrained_cfg`."""
    cfg = dpn_jax.pretrained_cfg("dpn68b.ra_in1k")
    legacy = {
        "architecture": ARCH,
        "num_classes": 3,
        "model_kwargs": {"k_sec": [1, 1, 1, 1], "groups": 4},
        "pretrained_cfg": {
            k: cfg[k]
            for k in (
                "input_size",
                "crop_pct",
                "interpolation",
                "mean",
                "std",
                "test_input_size",
                "test_crop_pct",
            )
        },
        "class_names": list(CLASSES),
        "source": "model.safetensors",
        "sha256": "ab" * 32,
        "dpn_jax_version": "0.1.0",
    }
    path = copy_with_metadata(saved, tmp_path / "old", lambda _: json.loads(json.dumps(legacy)))
    loaded = ModelDir.load(path)
    assert loaded.format_version == 0 and loaded.dpn_jax_version == "0.1.0"
    assert loaded.model_kwargs == TINY and loaded.class_names == CLASSES
    assert loaded.preprocessing == Preprocessing(
        input_size=(224, 224),
        crop_pct=0.95,
        interpolation="bicubic",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        test_input_size=(288, 288),
        test_crop_pct=1.0,
    )
    model_dir(variables, source="replacement").save(path, overwrite=True)
    assert ModelDir.load(path).source == "replacement"


def _pop(key):
    return lambda metadata: metadata.pop(key) and None


def _set(key, value):
    return lambda metadata: metadata.update({key: value})


def _set_preprocessing(key, value):
    return lambda metadata: metadata["preprocessing"].update({key: value})


BAD_METADATA = {
    "not JSON": (
        lambda _: '{"architecture": "dpn68",',
        ("not valid JSON (Expecting property name enclosed in double quotes at line 1"),
    ),
    "a list": (lambda _: "[1, 2]", "expected a JSON object, got list"),
    "missing key": (_pop("num_classes"), "missing key 'num_classes'"),
    "unknown key": (_set("clas_names", None), "unknown key 'clas_names'"),
    "num_classes a string": (
        _set("num_classes", "3"),
        "num_classes must be an integer >= 0, got '3'",
    ),
    "unknown architecture": (_set("architecture", "dpn69"), "architecture must be one of dpn48b"),
    "unknown model_kwargs key": (
        _set("model_kwargs", {"k_secs": [1, 1, 1, 1]}),
        "model_kwargs: unknown architecture field 'k_secs'",
    ),
    "bad model_kwargs value": (
        _set("model_kwargs", {"k_sec": [1, 1, 1]}),
        "model_kwargs: k_sec must be 4 positive integers",
    ),
    "class names count": (
        _set("class_names", ["cat", "dog"]),
        "class_names has 2 names for num_classes=3",
    ),
    "class names not strings": (
        _set("class_names", [1, 2, 3]),
        "class_names must be a list of strings or null",
    ),
    "preprocessing missing key": (
        lambda m: m["preprocessing"].pop("mean") and None,
        "preprocessing: missing key 'mean'",
    ),
    "preprocessing bad mean": (
        _set_preprocessing("mean", [0.5]),
        "preprocessing: mean must be 3 numbers",
    ),
    "preprocessing bad size": (
        _set_preprocessing("input_size", "224"),
        "preprocessing: input_size must be [height, width]",
    ),
    "absurd input_size": (  # would be a MemoryError resizing the first image
        _set_preprocessing("input_size", [10**9, 10**9]),
        "preprocessing: input_size must be [height, width] (integers in [1, 4096]), got [",
    ),
    "absurd crop_pct": (  # would be an OverflowError in the resize size
        _set_preprocessing("crop_pct", 1e-300),
        "preprocessing: crop_pct must be a number in [0.25, 1], got 1e-300",
    ),
    "absurd std": (  # would be NaN predictions
        _set_preprocessing("std", [1e-300, 0.2, 0.2]),
        "preprocessing: std must be 3 numbers (per RGB channel, >= 0.001), got [1e-300",
    ),
    "unknown interpolation": (  # was reported against the first image predicted
        _set_preprocessing("interpolation", "bicubix"),
        "preprocessing: interpolation must be one of nearest, bilinear, bicubic, box, hamming, "
        "lanczos, got 'bicubix'",
    ),
    "newer format": (
        _set("format_version", FORMAT_VERSION + 1),
        f"format_version {FORMAT_VERSION + 1} was written by a newer dpn_jax",
    ),
    "bad sha256": (_set("sha256", "xyz"), "sha256 must be 64 lowercase hex digits or null"),
    "hostile architecture": (_set("architecture", HOSTILE), "got '\\x1b]0;owned\\x07'"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_is_one_line_naming_the_file_and_key(case, saved, tmp_path):
    change, message = BAD_METADATA[case]
    path = copy_with_metadata(saved, tmp_path / "model", change)
    with pytest.raises(WeightsError) as error:
        ModelDir.load(path)
    text = str(error.value)
    assert text.startswith(f"{path / METADATA_FILE}: ") and message in text, text
    assert "\n" not in text and "\x1b" not in text


@pytest.mark.parametrize(
    "change, where, message",
    [
        (
            lambda m: m.update(num_classes=5, class_names=None),
            METADATA_FILE,
            "num_classes is 5, the classifier in variables/ has 3",
        ),
        (
            lambda m: m.update(model_kwargs={"k_sec": [1, 2, 1, 1], "groups": 4}),
            "variables",
            "missing tensor features.conv3_2.c1x1_a.bn.running_mean (model expects (224,))",
        ),
        (
            lambda m: m.update(model_kwargs={"k_sec": [1, 1, 1, 1], "groups": 8}),
            "variables",
            (
                "tensor features.conv2_1.c3x3_b.conv.weight has shape (128, 32, 3, 3), "
                "model expects (128, 16, 3, 3)"
            ),
        ),
    ],
)
def test_variables_that_do_not_fit_the_metadata_are_named(change, where, message, saved, tmp_path):
    path = copy_with_metadata(saved, tmp_path / "model", change)
    with pytest.raises(WeightsError) as error:
        ModelDir.load(path)
    assert str(error.value) == f"{path / where}: {message}"


def test_incomplete_or_missing_directories(saved, tmp_path):
    with pytest.raises(WeightsError, match=f"{tmp_path / 'nowhere'}: no such model directory"):
        ModelDir.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"is not a dpn_jax model directory \(no metadata"):
        ModelDir.load(tmp_path / "empty")
    shutil.copytree(saved, tmp_path / "half")
    shutil.rmtree(tmp_path / "half" / "variables")
    with pytest.raises(WeightsError, match="no variables/ directory"):
        ModelDir.load(tmp_path / "half")
    shutil.copytree(saved, tmp_path / "broken")
    for item in (tmp_path / "broken" / "variables").iterdir():
        if item.is_file():
            item.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="variables: not a readable orbax checkpoint"):
        ModelDir.load(tmp_path / "broken")


def test_class_names_from_files_are_printed_escaped(variables, tmp_path, capsys):
    names = (f"cat{HOSTILE}", "dog\u202egod", "fish")  # a control sequence, a bidi override
    path = model_dir(variables, class_names=names).save(tmp_path / "model")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    assert (
        predict_cli.main(
            [
                "--checkpoint",
                str(path),
                "--img-size",
                "32",
                "--top-k",
                "3",
                str(tmp_path / "red.png"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "cat\\x1b]0;owned\\x07" in out and "dog\\u202egod" in out
    assert (
        predict_cli.main(
            ["--checkpoint", str(path), "--img-size", "32", "--json", str(tmp_path / "red.png")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert {p["label"] for p in json.loads(out)[0]["top_k"]} == set(names)  # JSON keeps them exact


def test_a_training_workdir_points_to_its_model(saved, tmp_path):
    """`dpn-predict --checkpoint runs/digits` (the workdir, not runs/digits/model)."""
    shutil.copytree(saved, tmp_path / "run" / "model")
    (tmp_path / "run" / "checkpoints").mkdir()
    with pytest.raises(WeightsError) as error:
        ModelDir.load(tmp_path / "run")
    assert str(error.value) == (
        f"{tmp_path / 'run'} is not a dpn_jax model directory (no {METADATA_FILE}); "
        f"a train.py workdir: its model is {tmp_path / 'run' / 'model'}"
    )
