"""dpn-export: each format's artifact against dpn_jax and the real timm; the sidecars; bad input.

One random-BatchNorm timm DPN (one block per stage, 4 groups: XLA compiles it in seconds) is
converted and exported once per format (module-scoped fixtures); each artifact
runs in its own runtime (JAX, ONNX Runtime, TensorFlow) on two batch sizes through its one
dynamic-batch graph.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from timm_reference import numpy_state_dict, random_timm_dpn, relative_error, run_timm

from dpn_jax.cli import export as export_cli
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.data.transforms import eval_transform
from dpn_jax.export import exporter, read_serving_config, read_stablehlo
from dpn_jax.export.artifact_dir import MANIFEST_FILE
from dpn_jax.export.onnx import onnxruntime_session
from dpn_jax.models.registry import pretrained_cfg
from dpn_jax.ops.conv import CONV_LOWERINGS, conv2d, conv_lowering
from dpn_jax.ops.cpu_kernels import cpu_kernel_targets
from dpn_jax.weights.convert import timm_to_flax
from dpn_jax.weights.model_dir import ModelDir
from dpn_jax.weights.pretrained import replace_head

ARCH = "dpn68"
TINY = {"k_sec": (1, 1, 1, 1), "groups": 4}
NUM_CLASSES = 12
IMG_SIZE = 64
BATCH_SIZES = (1, 3)
TOLERANCE = 1e-4
FORMATS = ("stablehlo", "onnx", "savedmodel")


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    model = random_timm_dpn(ARCH, num_classes=NUM_CLASSES, **TINY)
    with torch.no_grad():  # spread the logits so the top 5 are far apart relative to float32 noise
        model.classifier.weight.mul_(8.0)
    return model


def save_converted(reference: torch.nn.Module, path: Path, num_classes: int = NUM_CLASSES) -> Path:
    """A model directory as dpn-convert writes it (4 groups are not a variant it detects)."""
    variables = timm_to_flax(numpy_state_dict(reference), ARCH, **TINY)
    if num_classes != NUM_CLASSES:
        variables = replace_head(variables, num_classes)
    ModelDir(
        architecture=ARCH,
        num_classes=num_classes,
        model_kwargs=TINY,
        variables=variables,
        preprocessing=Preprocessing.from_cfg(pretrained_cfg(f"{ARCH}.mx_in1k")),
        source="random timm model (test)",
    ).save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(reference, tmp_path_factory) -> Path:
    return save_converted(reference, tmp_path_factory.mktemp("model") / "dpn68_tiny")


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return (
        np.random.default_rng(0)
        .standard_normal((max(BATCH_SIZES), IMG_SIZE, IMG_SIZE, 3))
        .astype(np.float32)
    )


@pytest.fixture(scope="module")
def expected(model_dir, reference, pixels) -> dict[str, np.ndarray]:
    """Logits of dpn_jax (as it runs on CPU, with its kernels) and of timm on `pixels`."""
    loaded = ModelDir.load(model_dir)
    model, variables = loaded.build_model(), loaded.variables
    return {
        "dpn_jax": np.asarray(jax.jit(lambda x: model.apply(variables, x))(pixels)),
        "timm": run_timm(reference, pixels),
    }


def export(model_dir: Path, format: str, output: Path, *flags: str) -> int:
    return export_cli.main(
        [
            str(model_dir),
            "--format",
            format,
            "--output",
            str(output),
            "--img-size",
            str(IMG_SIZE),
            *flags,
        ]
    )


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory):
    """format -> its export directory (dynamic batch), each exported once, on first use."""
    root = tmp_path_factory.mktemp("exports")
    made: dict[str, Path] = {}

    def directory(format: str) -> Path:
        if format not in made:
            assert export(model_dir, format, root / format) == 0
            made[format] = root / format
        return made[format]

    return directory


@functools.cache
def runner(
    format: str, directory: Path, signature: str = "serving_default"
) -> Callable[[np.ndarray], np.ndarray]:
    """The artifact in its own runtime, loaded once: NHWC input -> output as numpy."""
    if format == "stablehlo":
        exported = read_stablehlo(directory)
        return lambda x: np.asarray(exported.call(x))
    if format == "onnx":
        session = onnxruntime_session(directory)
        return lambda x: session.run(
            None, {"pixels": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}
        )[0]
    import tensorflow as tf

    serve = tf.saved_model.load(str(directory / "saved_model")).signatures[signature]
    name = "pixels" if signature == "serving_default" else "images"
    return lambda x: serve(**{name: tf.constant(x)})["logits"].numpy()


def top5(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, axis=-1, kind="stable")[:, :5]


@pytest.mark.parametrize("format", FORMATS)
def test_artifact_matches_dpn_jax_and_timm(format, exports, pixels, expected):
    directory = exports(format)
    for batch in BATCH_SIZES:
        actual = runner(format, directory)(pixels[:batch])
        assert actual.shape == (batch, NUM_CLASSES)
        for engine, logits in expected.items():
            assert relative_error(actual, logits[:batch]) <= TOLERANCE, (engine, batch)
            np.testing.assert_array_equal(top5(actual), top5(logits[:batch]))


@pytest.mark.parametrize("format", FORMATS)
def test_sidecar_has_preprocessing_io_and_class_names(format, exports, model_dir):
    directory = exports(format)
    config = read_serving_config(directory)
    preprocessing = ModelDir.load(model_dir).preprocessing.as_dict()
    data_config = Preprocessing(**preprocessing).resolve(IMG_SIZE, use_test_size=True)
    preprocessing = config["preprocessing"]
    assert (preprocessing["image_size"], preprocessing["interpolation"]) == (IMG_SIZE, "bicubic")
    assert preprocessing["crop_pct"] == pretrained_cfg(ARCH)["crop_pct"] == data_config.crop_pct
    assert preprocessing["resize_shorter_side"] == int(IMG_SIZE / data_config.crop_pct)
    assert preprocessing["mean"] == list(pretrained_cfg(ARCH)["mean"])
    assert preprocessing["std"] == list(pretrained_cfg(ARCH)["std"])
    assert config["class_names"] is None  # a 12-class head without names: indices
    assert config["model"]["architecture"] == ARCH and config["model"]["num_classes"] == NUM_CLASSES
    layout = {"onnx": [None, 3, IMG_SIZE, IMG_SIZE]}.get(format, [None, IMG_SIZE, IMG_SIZE, 3])
    main = next(iter(config["entry_points"].values()))
    assert main["input"] | {"meaning": ""} == {
        "name": "pixels",
        "shape": layout,
        "dtype": "float32",
        "meaning": "",
    }
    assert main["output"]["name"] == "logits" and main["output"]["shape"] == [None, NUM_CLASSES]
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    on_disk = sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    )
    assert manifest["format"] == format and set(on_disk) <= set(manifest["files"])


def test_stablehlo_runs_with_jax_alone_on_any_platform(exports, pixels, expected, tmp_path):
    """The README's snippet: `jax.export.deserialize` in a process that never imports dpn_jax."""
    directory = exports("stablehlo")
    exported = read_stablehlo(directory)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    assert not any(f"@{target}(" in exported.mlir_module() for target in cpu_kernel_targets())
    assert read_serving_config(directory)["export"]["custom_call_targets"] == []
    np.save(tmp_path / "x.npy", pixels)
    script = textwrap.dedent(f"""
        import sys, jax, numpy as np
        exported = jax.export.deserialize(open({str(directory / "model.stablehlo")!r}, 'rb').read())
        x = np.load({str(tmp_path / "x.npy")!r})
        np.save({str(tmp_path / "y.npy")!r}, np.asarray(exported.call(x[:2])))
        assert not any(m.startswith('dpn_jax') for m in sys.modules), 'dpn_jax was imported'
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    assert relative_error(np.load(tmp_path / "y.npy"), expected["timm"][:2]) <= TOLERANCE


def test_stablehlo_with_cpu_kernels_lists_its_custom_calls(model_dir, pixels, expected, tmp_path):
    assert (
        export(
            model_dir,
            "stablehlo",
            tmp_path / "cpu",
            "--platforms",
            "cpu",
            "--conv-lowering",
            "kernels",
        )
        == 0
    )
    exported = read_stablehlo(tmp_path / "cpu")
    targets = read_serving_config(tmp_path / "cpu")["export"]["custom_call_targets"]
    assert exported.platforms == ("cpu",) and "dpn_grouped_conv_forward" in targets
    assert all(f"@{target}(" in exported.mlir_module() for target in targets)
    assert relative_error(np.asarray(exported.call(pixels)), expected["timm"]) <= TOLERANCE


def test_stablehlo_softmax_fixed_batch_and_bfloat16(model_dir, pixels, expected, tmp_path):
    assert (
        export(
            model_dir,
            "stablehlo",
            tmp_path / "out",
            "--softmax",
            "--batch-size",
            "3",
            "--dtype",
            "bfloat16",
        )
        == 0
    )
    exported = read_stablehlo(tmp_path / "out")
    assert [a.shape for a in exported.in_avals] == [(3, IMG_SIZE, IMG_SIZE, 3)]
    assert [a.dtype for a in exported.in_avals + exported.out_avals] == [np.float32] * 2
    probabilities = np.asarray(exported.call(pixels))
    reference = torch.softmax(torch.from_numpy(expected["timm"]), -1).numpy()
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    assert relative_error(probabilities, reference) <= 2e-2  # bfloat16 compute
    assert (
        read_serving_config(tmp_path / "out")["entry_points"]["main"]["output"]["name"]
        == "probabilities"
    )


def test_savedmodel_uint8_signature_normalises_inside(exports, model_dir):
    from PIL import Image

    directory = exports("savedmodel")
    images = np.random.default_rng(1).integers(0, 256, (3, IMG_SIZE, IMG_SIZE, 3), np.uint8)
    actual = runner("savedmodel", directory, "serving_uint8")(images)
    # What dpn-predict feeds the model for the same (already cropped) images.
    data_config = ModelDir.load(model_dir).preprocessing.resolve(IMG_SIZE, use_test_size=True)
    pixels = np.stack(
        [
            eval_transform(
                Image.fromarray(image),
                image_size=IMG_SIZE,
                crop_pct=1.0,
                mean=data_config.mean,
                std=data_config.std,
            )
            for image in images
        ]
    )
    assert relative_error(actual, runner("savedmodel", directory)(pixels)) <= TOLERANCE


def test_pretrained_tag_source(model_dir, tmp_path, monkeypatch, capsys):
    """A tag is read from the converted-weights cache (here: planted, so nothing downloads)."""
    monkeypatch.setenv("DPN_JAX_WEIGHTS_CACHE", str(tmp_path / "cache"))
    shutil.copytree(model_dir, tmp_path / "cache" / "dpn68.mx_in1k")
    assert (
        export_cli.main(
            [
                "dpn68",
                "--format",
                "stablehlo",
                "--output",
                str(tmp_path / "out"),
                "--img-size",
                str(IMG_SIZE),
            ]
        )
        == 0
    )
    assert (
        f"wrote {tmp_path / 'out'} (stablehlo, main: pixels float32[batch, {IMG_SIZE}"
        in capsys.readouterr().out
    )
    assert read_serving_config(tmp_path / "out")["model"]["source"] == "dpn68"


@pytest.mark.parametrize("lowering", CONV_LOWERINGS)
def test_conv_lowering_switch(lowering):
    """Only the "kernels" lowering calls dpn_jax's CPU kernels; all compute the same conv."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 32)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 8, 32)).astype(np.float32)  # 4 groups of 8 channels
    with conv_lowering(lowering):
        lowered = jax.jit(lambda x, k: conv2d(x, k, groups=4)).lower(x, kernel)
    text = lowered.as_text()
    assert ("dpn_grouped_conv_forward" in text) == (lowering == "kernels")
    # the XLA CPU form splits the groups into dense convolutions; native keeps one grouped conv
    assert ("feature_group_count = 4" in text) == (lowering == "native")
    expected = jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=4,
    )
    np.testing.assert_allclose(lowered.compile()(x, kernel), expected, rtol=1e-5, atol=1e-5)


# --- bad input: one line, exit 1, nothing written or deleted -----------------------------------


def assert_one_line_error(rc: int, stderr: str, message: str) -> None:
    assert rc == 1
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr, stderr


def tree(path: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(path.rglob("*"))
    }


BAD_OPTIONS = {
    "unknown format": (["--format", "tflite"], "unknown format 'tflite'; choose from stablehlo"),
    "unknown platform": (
        ["--format", "stablehlo", "--platforms", "cpu,gpu"],
        "unknown platform 'gpu'",
    ),
    "kernels on every platform": (
        ["--format", "stablehlo", "--conv-lowering", "kernels"],
        "pass --platforms cpu",
    ),
    "onnx needs native convs": (
        ["--format", "onnx", "--conv-lowering", "xla"],
        "--format onnx takes conv lowering native, not 'xla'",
    ),
    "bfloat16 onnx": (["--format", "onnx", "--dtype", "bfloat16"], "onnx exports float32 only"),
    "opset for stablehlo": (
        ["--format", "stablehlo", "--opset", "18"],
        "--opset applies to --format onnx",
    ),
    "batch size": (["--format", "stablehlo", "--batch-size", "0"], "batch size must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_options_are_refused_before_work(case, model_dir, tmp_path, capsys):
    flags, message = BAD_OPTIONS[case]
    rc = export_cli.main([str(model_dir), "--output", str(tmp_path / "out"), *flags])
    assert_one_line_error(rc, capsys.readouterr().err, message)
    assert list(tmp_path.iterdir()) == []


def test_source_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    rc = export_cli.main(
        [str(tmp_path / "folder"), "--format", "stablehlo", "--output", str(tmp_path / "out")]
    )
    assert_one_line_error(rc, capsys.readouterr().err, "is not a dpn_jax model directory")
    rc = export_cli.main(["dpn69", "--format", "stablehlo", "--output", str(tmp_path / "out")])
    assert_one_line_error(
        rc, capsys.readouterr().err, "dpn69: no such model directory, and not a pretrained model"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


@pytest.mark.parametrize(
    "format, package, extra",
    [("onnx", "jax2onnx", "onnx"), ("savedmodel", "tensorflow", "savedmodel")],
)
def test_missing_extra_names_the_install(
    format, package, extra, model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    rc = export(model_dir, format, tmp_path / "out")
    assert_one_line_error(rc, capsys.readouterr().err, f"pip install 'dpn_jax[{extra}]'")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_must_be_an_export(
    model_dir, exports, tmp_path, capsys
):
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "precious.txt").write_text("keep me")
    for flags in ([], ["--overwrite"]):
        rc = export(model_dir, "stablehlo", user_dir, *flags)
        assert_one_line_error(
            rc,
            capsys.readouterr().err,
            f"refusing to replace {user_dir}: it is not a dpn-export output"
            if flags
            else "already exists; pass --overwrite",
        )
        assert tree(user_dir) == {"precious.txt": b"keep me"}

    earlier = tmp_path / "earlier"
    shutil.copytree(exports("stablehlo"), earlier)
    (earlier / "notes.txt").write_text("mine")  # a file dpn-export did not write
    rc = export(model_dir, "stablehlo", earlier, "--overwrite")
    assert_one_line_error(
        rc, capsys.readouterr().err, f"refusing to replace {earlier}: it is not a dpn-export output"
    )
    (earlier / "notes.txt").unlink()
    assert export(model_dir, "stablehlo", earlier, "--overwrite", "--softmax") == 0
    assert read_serving_config(earlier)["export"]["softmax"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "mine"]  # no leftovers


def test_unwritable_output_location(model_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    rc = export(model_dir, "stablehlo", tmp_path / "a_file" / "out")
    assert_one_line_error(rc, capsys.readouterr().err, f"{tmp_path / 'a_file'} is not a directory")
    assert tree(tmp_path) == {"a_file": b"not a directory"}


def test_failed_export_leaves_nothing(model_dir, tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(exporter, "_writer", lambda format: fail)
    with pytest.raises(RuntimeError, match="converter crashed"):
        export(model_dir, "stablehlo", tmp_path / "new" / "parents" / "out")
    assert list(tmp_path.iterdir()) == []


def test_softmax_needs_a_classifier(reference, tmp_path, capsys):
    headless = save_converted(reference, tmp_path / "headless", num_classes=0)
    rc = export(headless, "stablehlo", tmp_path / "out", "--softmax")
    assert_one_line_error(rc, capsys.readouterr().err, "has no classifier (num_classes=0)")
    assert [p.name for p in tmp_path.iterdir()] == ["headless"]
