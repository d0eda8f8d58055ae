"""dpn-evaluate: every example counted once, accuracies and loss equal to a hand computation."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import dpn_jax
from dpn_jax.cli import evaluate as evaluate_cli
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.data.transforms import eval_transform, load_image
from dpn_jax.infer import evaluate
from dpn_jax.weights.model_dir import ModelDir

NUM_CLASSES = 8
TINY = {"k_sec": (1, 1, 1, 1), "groups": 4}
# Image i goes to the class its logits rank RANKS[i]-th (0 = top-1): 4 top-1 hits, 3 more top-5
# hits, 4 misses. 11 images: batches of 4 and 8 both end with padding.
RANKS = [0, 0, 0, 0, 2, 3, 4, 5, 6, 7, 7]
CFG = {
    **Preprocessing.from_cfg(dpn_jax.pretrained_cfg("dpn68.mx_in1k")).as_dict(),
    "input_size": (32, 32),
    "crop_pct": 1.0,
}


@pytest.fixture(scope="module")
def model_and_variables():
    return dpn_jax.create_model("dpn68", num_classes=NUM_CLASSES, rng=jax.random.PRNGKey(3), **TINY)


@pytest.fixture(scope="module")
def dataset(model_and_variables, tmp_path_factory):
    """folder:ROOT with validation/c0..c7, images placed by their logits: (root, logits, labels)."""
    model, variables = model_and_variables
    root = tmp_path_factory.mktemp("folder_dataset")
    staging = tmp_path_factory.mktemp("staging")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(len(RANKS)):
        paths.append(staging / f"img{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), np.uint8)).save(paths[-1])
    config = Preprocessing(**CFG).resolve(use_test_size=True)
    pixels = np.stack(
        [
            eval_transform(
                load_image(p),
                image_size=config.image_size,
                crop_pct=config.crop_pct,
                interpolation=config.interpolation,
                mean=config.mean,
                std=config.std,
            )
            for p in paths
        ]
    )
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, pixels), np.float64)
    labels = np.array([np.argsort(-row)[rank] for row, rank in zip(logits, RANKS)])
    for c in range(NUM_CLASSES):
        (root / "validation" / f"c{c}").mkdir(parents=True)
    for path, label in zip(paths, labels):
        path.rename(root / "validation" / f"c{label}" / path.name)
    (root / "train" / "c0").mkdir(parents=True)  # dataset_info also counts the train split
    Image.new("RGB", (40, 40)).save(root / "train" / "c0" / "only.png")
    return root, logits, labels


def save_tiny_model(path, variables) -> None:
    ModelDir(
        architecture="dpn68",
        num_classes=NUM_CLASSES,
        model_kwargs=TINY,
        preprocessing=Preprocessing(**CFG),
        variables=variables,
        class_names=[f"c{c}" for c in range(NUM_CLASSES)],
        source="test",
    ).save(path)


def hand_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    log_normaliser = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return {
        "top1": np.mean(top5[:, 0] == labels),
        "top5": np.mean((top5 == labels[:, None]).any(-1)),
        "loss": float(np.mean(log_normaliser - logits[np.arange(len(labels)), labels])),
    }


def test_folder_dataset_metrics_equal_hand_computation(model_and_variables, dataset):
    model, variables = model_and_variables
    root, logits, labels = dataset
    expected = hand_metrics(logits, labels)
    assert (expected["top1"], expected["top5"]) == (4 / 11, 7 / 11)  # the layout worked
    assert len(jax.devices()) == 4  # conftest: the batch is sharded over 4 devices
    for parallelism in ("shard_map", "pmap"):  # one evaluation step, either runner
        result, skipped = evaluate.evaluate_dataset(
            model,
            variables,
            f"folder:{root}",
            Preprocessing(**CFG).resolve(use_test_size=True),
            batch_size=4,
            parallelism=parallelism,
            progress=False,
        )
        assert (result.count, skipped) == (len(RANKS), 0)
        assert result.top1 == pytest.approx(expected["top1"], abs=1e-9)
        assert result.top5 == pytest.approx(expected["top5"], abs=1e-9)
        assert result.loss == pytest.approx(expected["loss"], rel=1e-5)
        assert result.img_per_sec > 0


def test_cli_json_on_a_checkpoint(model_and_variables, dataset, tmp_path, capsys):
    model, variables = model_and_variables
    root, logits, labels = dataset
    save_tiny_model(tmp_path / "model", variables)
    code = evaluate_cli.main(
        [
            "--checkpoint",
            str(tmp_path / "model"),
            "--dataset",
            f"folder:{root}",
            "--batch-size",
            "8",
            "--json",
            "--no-progress",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads(out)
    expected = hand_metrics(logits, labels)
    assert results["count"] == len(RANKS)
    assert results["top1"] == pytest.approx(expected["top1"], abs=1e-9)
    assert results["top5"] == pytest.approx(expected["top5"], abs=1e-9)
    assert results["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert (results["img_size"], results["crop_pct"]) == (32, 1.0)


def test_undecodable_image_is_skipped_and_reported(model_and_variables, dataset, tmp_path):
    model, variables = model_and_variables
    root, logits, labels = dataset
    shutil.copytree(root, tmp_path / "data")
    (tmp_path / "data" / "validation" / "c1" / "corrupt.png").write_bytes(
        b"\x89PNG\r\n\x1a\n broken"
    )
    result, skipped = evaluate.evaluate_dataset(
        model,
        variables,
        f"folder:{tmp_path / 'data'}",
        Preprocessing(**CFG).resolve(use_test_size=True),
        batch_size=4,
        progress=False,
    )
    assert (result.count, skipped) == (len(RANKS), 1)
    assert result.top1 == pytest.approx(hand_metrics(logits, labels)["top1"], abs=1e-9)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "6"], "batch size=6 must be a positive multiple of the 4 devices"),
        (["--dataset", "digits"], "dataset digits has 10 classes, the model 8"),
        (["--dataset", "folder:/nonexistent/data"], "no such directory"),
    ],
)
def test_bad_arguments_give_one_error_line(
    argv, message, model_and_variables, dataset, tmp_path, capsys
):
    model, variables = model_and_variables
    save_tiny_model(tmp_path / "model", variables)
    argv = ["--checkpoint", str(tmp_path / "model"), "--dataset", f"folder:{dataset[0]}", *argv]
    code = evaluate_cli.main(argv + ["--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and message in err


MULTI_PROCESS_SCRIPT = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from dpn_jax.cli import evaluate as evaluate_cli
sys.exit(evaluate_cli.main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_two_processes_count_every_example_once(model_and_variables, dataset, tmp_path):
    """2 processes x 2 devices, global batch 4: each process reads its half, sums are global."""
    root, logits, labels = dataset
    save_tiny_model(tmp_path / "model", model_and_variables[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    argv = [
        "--checkpoint",
        str(tmp_path / "model"),
        "--dataset",
        f"folder:{root}",
        "--batch-size",
        "4",
        "--json",
        "--no-progress",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTI_PROCESS_SCRIPT, str(port), str(i), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=400) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], (
        outputs[0][1][-3000:] + outputs[1][1][-3000:]
    )
    assert "top1" not in outputs[1][0]  # only process 0 reports (gloo logs to stdout too)
    results = json.loads(outputs[0][0][outputs[0][0].index("{") :])
    expected = hand_metrics(logits, labels)
    assert results["count"] == len(RANKS)
    assert results["top1"] == pytest.approx(expected["top1"], abs=1e-9)
    assert results["top5"] == pytest.approx(expected["top5"], abs=1e-9)
    assert results["loss"] == pytest.approx(expected["loss"], rel=1e-5)
