"""One of each small helper (issue 28): the image extensions a folder dataset lists, what counts
as a number in settings and metadata, and the dtypes by name."""

from __future__ import annotations

import io
import math

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dpn_jax.data import folder
from dpn_jax.data.sources import open_dataset
from dpn_jax.errors import ConfigError, is_int, is_number, is_positive_int
from dpn_jax.export.exporter import ExportOptions
from dpn_jax.infer import predict
from dpn_jax.models.layers import DTYPES
from dpn_jax.train.config import RULES


def test_a_folder_dataset_reads_the_formats_dpn_predict_reads(tmp_path):
    """A .tif (or .tiff, .ppm) among a folder dataset's images was skipped silently."""
    pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    for name in ("a.png", "b.tif", "c.TIFF", "d.ppm", "notes.txt"):
        (tmp_path / "train" / "cls").mkdir(parents=True, exist_ok=True)
        if name.endswith("txt"):
            (tmp_path / "train" / "cls" / name).write_text("not an image")
        else:
            Image.fromarray(pixels).save(tmp_path / "train" / "cls" / name)
    records = open_dataset(f"folder:{tmp_path}").records("train")
    names = [records[i]["name"].rsplit("/", 1)[1] for i in range(len(records))]
    assert names == ["a.png", "b.tif", "c.TIFF", "d.ppm"]
    tif = np.asarray(Image.open(io.BytesIO(records[1]["image"])))
    np.testing.assert_array_equal(tif, pixels)
    assert predict.IMAGE_EXTENSIONS is folder.IMAGE_EXTENSIONS


@pytest.mark.parametrize("value", [0, -3, 2**80, 0.5, np.float32(1.5), np.int64(7)])
def test_numbers(value):
    assert is_number(value)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, np.float32("inf"), True, "1"])
def test_not_numbers(value):
    assert not is_number(value)


def test_integers():
    assert is_int(3) and is_int(np.int32(3)) and is_int(-(2**80))
    assert not any(map(is_int, (True, 3.0, "3", None)))
    assert is_positive_int(1) and not any(map(is_positive_int, (0, -1, True, 1.0)))


def test_settings_and_metadata_refuse_inf_alike():
    check, _ = RULES["mean"]
    assert check((0.5, 0.5, 0.5)) and not check((0.5, math.inf, 0.5))


def test_dtypes_by_name():
    assert DTYPES == {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
    check, _ = RULES["dtype"]
    assert all(map(check, DTYPES)) and not check("float16")
    with pytest.raises(ConfigError, match="unknown dtype 'float64'; choose from float32, bfloat16"):
        ExportOptions(dtype="float64").check("stablehlo")
