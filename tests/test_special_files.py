"""Inputs that are not regular files (a FIFO, a device) are refused in one line: reading one
would block forever (a FIFO waits for a writer) or never end (/dev/zero)."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
import pytest
from PIL import Image

import dpn_jax
from dpn_jax.cli import predict as predict_cli
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.data.sources import open_dataset
from dpn_jax.errors import DataError
from dpn_jax.weights.model_dir import ModelDir


@pytest.fixture(autouse=True)
def no_hang():
    """A test that blocks fails after 60 s instead of hanging the suite."""

    def hung(signum, frame):
        raise TimeoutError("blocked reading a special file")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_folder_dataset_refuses_a_fifo_among_its_images(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / name / "0.png")
    fifo = tmp_path / "train" / "a" / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(DataError) as error:
        open_dataset(f"folder:{tmp_path}").records("train")
    assert str(error.value) == (
        f"folder dataset {str(tmp_path)!r}: {fifo} is a FIFO, not a regular file; "
        "move it out of the dataset"
    )


@pytest.mark.parametrize("special", ["fifo.png", "/dev/zero"])
def test_predict_refuses_special_files_and_goes_on(special, tmp_path, capsys):
    tiny = {"k_sec": (1, 1, 1, 1), "groups": 4}
    variables = jax.device_get(dpn_jax.create_model("dpn68", num_classes=2, **tiny)[1])
    checkpoint = ModelDir(
        architecture="dpn68",
        num_classes=2,
        model_kwargs=tiny,
        preprocessing=Preprocessing.from_cfg(dpn_jax.pretrained_cfg("dpn68")),
        variables=variables,
    ).save(tmp_path / "model")
    if special == "fifo.png":
        special = tmp_path / special
        os.mkfifo(special)
        kind = "a FIFO"
    else:
        kind = "a character device"
    Image.fromarray(np.full((40, 40, 3), 99, np.uint8)).save(tmp_path / "good.png")
    argv = ["--checkpoint", checkpoint, "--img-size", "32", special, tmp_path / "good.png"]
    code = predict_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.splitlines() == [
        f"dpn-predict: error: {special}: {kind}, not a regular file (an image)"
    ]
    assert "good.png" in out
