"""dpn-predict and `Predictor`: timm parity on photos in every image format, labels, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from timm_reference import numpy_state_dict, random_timm_dpn

import dpn_jax
from dpn_jax.cli import predict as predict_cli
from dpn_jax.data.labels import class_names, imagenet_classes
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.infer import predict
from dpn_jax.weights.convert import timm_to_flax
from dpn_jax.weights.model_dir import ModelDir

ARCH = (
    "dpn68b"  # its default tag dpn68b.ra_in1k has a test size (288, crop 1.0) and ImageNet mean/std
)
TINY = {"k_sec": (1, 1, 1, 1), "groups": 4}  # groups=4: XLA CPU compiles in seconds, not a minute


def model_dir(
    arch: str, variables: dict, num_classes: int, class_names=None, **model_kwargs
) -> ModelDir:
    return ModelDir(
        architecture=arch,
        num_classes=num_classes,
        model_kwargs=model_kwargs,
        preprocessing=Preprocessing.from_cfg(dpn_jax.pretrained_cfg(arch)),
        variables=variables,
        class_names=class_names,
        source="random timm model (test)",
    )


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    model = random_timm_dpn(ARCH, num_classes=1000, **TINY)
    with torch.no_grad():  # spread the logits so the top 5 are far apart relative to float32 noise
        model.classifier.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoints") / "dpn68b_tiny"
    model_dir(ARCH, timm_to_flax(numpy_state_dict(reference), ARCH, **TINY), 1000, **TINY).save(
        path
    )
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """scikit-learn's two photos as shipped, and converted to every mode and format we accept."""
    folder = tmp_path_factory.mktemp("photos")
    sample = load_sample_images()
    for filename in sample.filenames:
        (folder / Path(filename).name).write_bytes(Path(filename).read_bytes())
    china, flower = (Image.fromarray(image) for image in sample.images)
    china.convert("L").save(folder / "china_gray.png")
    china.convert("CMYK").save(folder / "china_cmyk.jpg", quality=95)
    china.save(folder / "china.bmp")
    flower.convert("RGBA").save(folder / "flower_rgba.png")
    flower.convert("LA").save(folder / "flower_la.png")
    flower.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "flower_palette.png")
    flower.save(folder / "flower.webp", lossless=True)
    frames = [flower.convert("P", palette=Image.Palette.ADAPTIVE), china.convert("P")]
    frames[0].save(folder / "flower_animated.gif", save_all=True, append_images=frames[1:])
    return folder


def timm_probabilities(model: torch.nn.Module, path: Path, use_test_size: bool) -> np.ndarray:
    """What timm's inference.py computes: PIL convert('RGB'), create_transform, softmax."""
    config = timm.data.resolve_data_config({}, model=model, use_test_size=use_test_size)
    transform = timm.data.create_transform(**config)
    with Image.open(path) as image:
        pixels = transform(image.convert("RGB"))
    with torch.no_grad():
        return model(pixels[None]).softmax(-1)[0].numpy()


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = predict_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("use_train_size", [False, True], ids=["test_size_288", "train_size_224"])
def test_top5_and_probabilities_match_timm_in_every_format(
    reference, checkpoint, photos, capsys, use_train_size
):
    flags = ["--use-train-size"] if use_train_size else []
    code, out, err = run_main(
        capsys, "--checkpoint", checkpoint, "--json", "--batch-size", 5, *flags, photos
    )
    assert code == 0, err
    results = json.loads(out)
    files = sorted(photos.iterdir())
    assert [r["file"] for r in results] == [str(f) for f in files]
    names = [c.name for c in imagenet_classes()]
    for result, path in zip(results, files):
        expected = timm_probabilities(reference, path, use_test_size=not use_train_size)
        expected_top5 = np.argsort(-expected)[:5]
        assert [p["index"] for p in result["top_k"]] == expected_top5.tolist(), path.name
        np.testing.assert_allclose(
            [p["prob"] for p in result["top_k"]],
            expected[expected_top5],
            atol=1e-3,
            err_msg=path.name,
        )
        assert [p["label"] for p in result["top_k"]] == [names[i] for i in expected_top5]


def test_test_size_is_used_unless_train_size_is_asked(checkpoint):
    test_size = predict.Predictor.load(checkpoint)
    train_size = predict.Predictor.load(checkpoint, use_test_size=False)
    override = predict.Predictor.load(checkpoint, img_size=64, crop_pct=0.5)
    assert (test_size.preprocessing.image_size, test_size.preprocessing.crop_pct) == (288, 1.0)
    assert (train_size.preprocessing.image_size, train_size.preprocessing.crop_pct) == (224, 0.95)
    assert (override.preprocessing.image_size, override.preprocessing.crop_pct) == (64, 0.5)
    assert test_size.preprocessing.mean == (0.485, 0.456, 0.406)


def test_table_output(checkpoint, photos, capsys):
    code, out, err = run_main(
        capsys, "--checkpoint", checkpoint, "--top-k", 3, "--img-size", 64, photos / "china.jpg"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(photos / "china.jpg") and len(lines) == 4
    probs = [float(line.split()[0]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and all(0 < p < 1 for p in probs)
    index = int(lines[1].split()[1])
    assert lines[1].endswith(imagenet_classes()[index].name)


@pytest.fixture(scope="module")
def predictor(checkpoint) -> predict.Predictor:
    """One Predictor at 64 px shared by the API tests, so they share its compiled batch shapes."""
    return predict.Predictor.load(checkpoint, img_size=64, batch_size=4)


def test_predictor_batches_compile_once_per_shape(predictor, photos):
    files = sorted(photos.glob("*.png"))  # 4 files
    pixels = np.stack([predictor.preprocess(f) for f in files] * 2)[:7]
    batched = predictor.probabilities(pixels)  # batches of 4 and 3 (padded to 4)
    one_by_one = np.concatenate([predictor.probabilities(pixels[i : i + 1]) for i in range(7)])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-7)
    # 4, 3 and 1 images all pad to one row per device (tests/conftest.py: 4 devices): one shape
    assert predictor.runner.num_devices == 4 and predictor._probabilities._cache_size() == 1
    # PIL images in modes L, LA, P, RGBA are converted to RGB before resizing, as files are
    top = predictor.predict([Image.open(f) for f in files], top_k=2)
    assert [Image.open(f).mode for f in files] == ["L", "LA", "P", "RGBA"]
    assert [len(t) for t in top] == [2] * 4
    np.testing.assert_allclose([t[0]["prob"] for t in top], batched[:4].max(-1), rtol=1e-5)


def test_pretrained_reads_the_converted_weights_cache(
    checkpoint, predictor, photos, tmp_path, monkeypatch, capsys
):
    """--pretrained resolves an architecture to its default tag in the weights cache (offline)."""
    shutil.copytree(checkpoint, tmp_path / "dpn68b.ra_in1k")
    monkeypatch.setenv("DPN_JAX_WEIGHTS_CACHE", str(tmp_path))
    code, out, err = run_main(
        capsys,
        "--model",
        "dpn68b",
        "--pretrained",
        "--json",
        "--img-size",
        64,
        "--top-k",
        1,
        photos / "china.jpg",
    )
    assert code == 0, err
    expected = predictor.predict([photos / "china.jpg"], top_k=1)[0]
    assert json.loads(out)[0]["top_k"][0]["index"] == expected[0]["index"]
    assert json.loads(out)[0]["top_k"][0]["prob"] == pytest.approx(expected[0]["prob"], rel=1e-5)


def test_fine_tuned_checkpoint_uses_its_class_names(tmp_path, photos, capsys):
    model, variables = dpn_jax.create_model("dpn68", num_classes=3, **TINY)
    model_dir("dpn68", variables, 3, ["cat", "dog", "fish"], **TINY).save(tmp_path / "ft")
    code, out, err = run_main(
        capsys, "--checkpoint", tmp_path / "ft", "--json", "--img-size", 32, photos / "flower.jpg"
    )
    assert code == 0, err
    top_k = json.loads(out)[0]["top_k"]
    assert len(top_k) == 3 and sorted(p["label"] for p in top_k) == ["cat", "dog", "fish"]
    assert sum(p["prob"] for p in top_k) == pytest.approx(1.0, abs=1e-5)


def test_exif_orientation_and_16_bit(predictor, photos, tmp_path):
    upright = Image.open(photos / "china_gray.png")
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with "rotate 90 clockwise to display"
    rotated.save(tmp_path / "tagged.png", exif=exif)
    rotated.save(tmp_path / "untagged.png")
    Image.fromarray(np.asarray(upright, np.uint16) * 257).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"

    probs = {
        name: predictor.probabilities(predictor.preprocess(path)[None])[0]
        for name, path in [
            ("upright", photos / "china_gray.png"),
            ("tagged", tmp_path / "tagged.png"),
            ("untagged", tmp_path / "untagged.png"),
            ("gray16", tmp_path / "gray16.png"),
        ]
    }
    np.testing.assert_allclose(probs["tagged"], probs["upright"], rtol=1e-5)
    np.testing.assert_allclose(probs["gray16"], probs["upright"], rtol=1e-5)
    assert np.abs(probs["untagged"] - probs["upright"]).max() > 1e-4  # the orientation matters


def test_bad_and_huge_files_are_reported_one_line_each_and_the_rest_is_processed(
    checkpoint, photos, tmp_path
):
    """Missing, empty, non-image and truncated files each get one error line naming them; a
    30000x30000 PNG (112 MB as 1-bit, 2.7 GB as RGB) is refused without being decoded."""
    good = photos / "flower.jpg"
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:2000])
    Image.new("1", (30000, 30000)).save(tmp_path / "huge.png")
    bad = [
        tmp_path / name
        for name in ("missing.jpg", "empty.jpg", "text.png", "truncated.jpg", "huge.png")
    ]
    measure = (
        "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            measure,
            sys.executable,
            "-m",
            "dpn_jax.cli.predict",
            "--checkpoint",
            str(checkpoint),
            "--json",
            "--img-size",
            "32",
            *map(str, [bad[0], good, *bad[1:]]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    *json_lines, last_line = proc.stdout.splitlines()
    returncode, max_rss_kib = map(int, last_line.split())
    assert returncode == 1
    assert [r["file"] for r in json.loads("\n".join(json_lines))] == [str(good)]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dpn-predict: error:")]
    assert len(errors) == len(bad), proc.stderr
    for line, path in zip(errors, bad):
        assert str(path) in line
    assert max_rss_kib < 2 * 1024 * 1024, f"peak RSS {max_rss_kib / 1024:.0f} MiB"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "{tmp}/nowhere"], "nowhere: no such model directory"),
        (
            ["--checkpoint", "{ckpt}", "--model", "dpn92"],
            "does not match the checkpoint's architecture dpn68b",
        ),
    ],
)
def test_bad_checkpoint_arguments(argv, message, checkpoint, photos, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in argv]
    code, out, err = run_main(capsys, *argv, photos / "china.jpg")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and message in err


def test_usage_errors_exit_2(checkpoint, photos, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main(["--pretrained", str(photos / "china.jpg")])
    assert exit_info.value.code == 2 and "--pretrained needs --model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main(["--checkpoint", str(checkpoint), "--crop-pct", "1.5", str(photos)])
    assert exit_info.value.code == 2 and "--crop-pct" in capsys.readouterr().err


def test_folder_without_images(checkpoint, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no images here")
    code, out, err = run_main(capsys, "--checkpoint", checkpoint, tmp_path)
    assert code == 1 and "no images found" in err


def test_shipped_imagenet_labels_equal_timms():
    info = timm.data.ImageNetInfo()
    classes = imagenet_classes()
    assert [c.index for c in classes] == list(range(1000))
    assert [c.synset for c in classes] == info.label_names()
    assert [c.name for c in classes] == info.label_descriptions()
    assert class_names(1000)[0] == "tench, Tinca tinca" and class_names(10) is None
    with pytest.raises(ValueError, match="2 class names for a 3-class head"):
        class_names(3, ["a", "b"])
