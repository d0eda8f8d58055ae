"""Faster host decoding that keeps the recipe: `dpn-prepare-data --resize-shorter` (a pre-resized
ArrayRecord copy) and reduced-size (DCT-scaled) JPEG decoding, checked against timm's
RandomResizedCrop statistics and against the full decode's pixels."""

import io
import json
import math
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_augment import assert_same_distribution
from test_input_pipeline import SYNSETS, add_to_tar

from dpn_jax.data import pipeline
from dpn_jax.data.resized import PREPARED_FILE, describe_copy, describe_images, resized_jpeg
from dpn_jax.data.transforms import (
    TrainTransform,
    decode_image,
    eval_crop,
    random_resized_crop_window,
    reduced_eval_crop,
    reduced_train_crop,
    resized_crop,
)

SAMPLES = 4000


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth photo-like image (gradients, blobs, mild noise): resizing and JPEG re-encoding
    change it little, as with real photos, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for c in range(3):
        value = 120 + 60 * np.sin(2 * np.pi * (x * (2 + c) + y * (1 + seed % 3)))
        for _ in range(4):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
            value += 50 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        channels.append(value + rng.normal(0, 3, value.shape))
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# ------------------------------------------------------------------------ reduced-size decoding


def test_reduced_eval_crop_is_close_to_timms_and_decodes_less():
    """Eval: a 4x larger JPEG drafts at 1/2 or 1/4 and stays close to the full decode; an image
    too small to draft takes the exact path (bit-identical)."""
    settings = dict(image_size=32, crop_pct=0.875, interpolation="bicubic")
    for size, seed in (((160, 120), 1), ((120, 160), 2), ((300, 200), 3)):
        encoded = jpeg(photo(*size, seed=seed))
        full = eval_crop(decode_image(encoded, "x"), **settings)
        reduced = reduced_eval_crop(encoded, "x", **settings)
        assert reduced.shape == full.shape == (32, 32, 3)
        difference = np.abs(reduced.astype(int) - full.astype(int))
        assert difference.mean() < 2.0 and not (reduced == full).all(), difference.mean()
    small = jpeg(photo(60, 45))  # 36 px resize target: no 1/2 scale keeps it
    np.testing.assert_array_equal(
        reduced_eval_crop(small, "x", **settings), eval_crop(decode_image(small, "x"), **settings)
    )
    needed = []
    decode_image(jpeg(photo(160, 120)), "x", lambda w, h: needed.append((w, h)) or (40, 36))
    image = decode_image(jpeg(photo(160, 120)), "x", lambda w, h: (40, 36))
    # min(160 // 40, 120 // 36) = 3: 1/2 is the smallest scale keeping 40x36 (1/4 would not)
    assert needed == [(160, 120)] and image.size == (80, 60)


def test_reduced_decoding_follows_exif_orientation():
    """A JPEG stored 400x100 and shown 100x400 (EXIF orientation 6): the caller's size needs
    are about the shown image, and the decode is reduced by the scale they allow."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise when shown
    buffer = io.BytesIO()
    Image.fromarray(photo(400, 100)).save(buffer, "JPEG", quality=95, exif=exif)
    seen = []
    image = decode_image(buffer.getvalue(), "x", lambda w, h: seen.append((w, h)) or (50, 200))
    assert seen == [(100, 400)] and image.size == (50, 200)  # 1/2 scale, shown upright
    full = decode_image(buffer.getvalue(), "x")
    settings = dict(image_size=32, crop_pct=0.875, interpolation="bicubic")
    difference = np.abs(
        reduced_eval_crop(buffer.getvalue(), "x", **settings).astype(int)
        - eval_crop(full, **settings).astype(int)
    )
    assert full.size == (100, 400) and difference.mean() < 2.0


def test_reduced_train_crop_has_timms_windows_and_close_pixels():
    """Train: the same draws give the same windows (so timm's scale/aspect statistics, checked
    against timm in test_augment), a crop window >= 2x the output decodes reduced, and the
    pixels stay close to the full decode's crop of the same window."""
    encoded = jpeg(photo(256, 192, seed=4))
    full_image = decode_image(encoded, "x")
    differences, reduced_count = [], 0
    for seed in range(40):
        rng_full, rng_reduced = np.random.default_rng(seed), np.random.default_rng(seed)
        window = random_resized_crop_window(192, 256, rng_full)
        flip = rng_full.random() < 0.5
        full = resized_crop(full_image, window, 24, "bicubic", flip=flip)
        reduced = reduced_train_crop(encoded, "x", 24, "bicubic", rng_reduced)
        assert rng_full.random() == rng_reduced.random()  # the same number of draws
        reduced = np.asarray(reduced)
        if min(window[2], window[3]) >= 48:
            reduced_count += 1
            differences.append(np.abs(reduced.astype(int) - full.astype(int)).mean())
        else:
            np.testing.assert_array_equal(reduced, full)  # window < 2x output: the exact path
    assert reduced_count >= 10 and np.mean(differences) < 3.0, (reduced_count, differences)


def test_train_transform_reduced_decode_keeps_the_crops():
    """`TrainTransform.from_encoded` with and without reduced decoding: same output shapes and
    close pixels for every seed, including RandAugment after the crop."""
    encoded = jpeg(photo(320, 240, seed=5))
    for aa in (None, "rand-m9-mstd0.5-inc1"):
        exact = TrainTransform(image_size=32, interpolation="bicubic", aa=aa)
        reduced = TrainTransform(image_size=32, interpolation="bicubic", aa=aa, reduced_decode=True)
        for seed in range(6):
            a = exact.from_encoded(encoded, "x", np.random.default_rng(seed))
            b = reduced.from_encoded(encoded, "x", np.random.default_rng(seed))
            assert a.shape == b.shape == (32, 32, 3)
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 6.0


# ---------------------------------------------------------------------- pre-resized ArrayRecord


def test_resized_jpeg_sizes():
    big, small = jpeg(photo(200, 150)), jpeg(photo(40, 30))
    image = Image.open(io.BytesIO(resized_jpeg(big, "x", 48, 90)))
    assert image.format == "JPEG" and image.size == (64, 48)
    tall = Image.open(io.BytesIO(resized_jpeg(jpeg(photo(150, 200)), "x", 48, 90)))
    assert tall.size == (48, 64)
    assert resized_jpeg(small, "x", 48, 90) is small  # never upscaled: the same bytes
    assert resized_jpeg(b"not an image", "x", 48, 90) == b"not an image"


def test_prepared_crop_statistics_match_timm_on_the_original():
    """Training crops on a pre-resized image (shorter side 256) against timm's RandomResizedCrop
    on the original 500x375: the same distribution of area fraction and aspect ratio."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    random.seed(0)  # timm draws from Python's random
    theirs_scale, theirs_aspect = [], []
    timm_crop = RandomResizedCropAndInterpolation(224)
    original = Image.new("RGB", (500, 375))
    for _ in range(SAMPLES):
        top, left, h, w = timm_crop.get_params(original, timm_crop.scale, timm_crop.ratio)
        theirs_scale.append(h * w / (500 * 375))
        theirs_aspect.append(math.log(w / h))
    rng = np.random.default_rng(0)
    ours_scale, ours_aspect = [], []
    prepared = resized_jpeg(jpeg(photo(500, 375)), "x", 256, 90)
    prepared_w, prepared_h = Image.open(io.BytesIO(prepared)).size
    assert (prepared_w, prepared_h) == (341, 256)
    for _ in range(SAMPLES):
        top, left, h, w = random_resized_crop_window(prepared_h, prepared_w, rng)
        ours_scale.append(h * w / (prepared_w * prepared_h))
        ours_aspect.append(math.log(w / h))
    assert_same_distribution(ours_scale, theirs_scale, "crop area fraction")
    assert_same_distribution(ours_aspect, theirs_aspect, "crop log aspect")


@pytest.fixture(scope="module")
def imagenet_photos(tmp_path_factory):
    """A tiny imagenet2012 manual dir of photo-like JPEGs (some larger than the 48-pixel
    resize, one smaller), prepared as ArrayRecord; (data_dir, manual_dir, root)."""
    pytest.importorskip("tensorflow")
    from dpn_jax.data.tfds_source import prepare

    root = tmp_path_factory.mktemp("photos")
    manual = root / "manual"
    manual.mkdir()
    sizes = [(120, 90), (90, 120), (40, 36)]
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
        for s, synset in enumerate(SYNSETS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as synset_tar:
                for i, size in enumerate(sizes):
                    add_to_tar(synset_tar, f"{synset}_{i}.JPEG", jpeg(photo(*size, seed=3 * s + i)))
            add_to_tar(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(3):
            add_to_tar(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(photo(100, 80, seed=10 + i)))
    data_dir = str(root / "tfds")
    prepare("imagenet2012", data_dir=data_dir, manual_dir=str(manual))
    return data_dir, str(manual), root


def resized_copy(imagenet_photos) -> tuple[str, list[str], list[str]]:
    """`dpn-prepare-data imagenet2012 --resize-shorter 48 --quality 90` into ROOT/resized
    (written, or reused when an earlier test wrote it); (its data dir, the flags)."""
    from dpn_jax.cli.prepare_data import main as prepare_main

    data_dir, manual, root = imagenet_photos
    copy = str(root / "resized")
    flags = ["--data-dir", data_dir, "--manual-dir", manual]
    resize = ["--resize-shorter", "48", "--quality", "90", "--output-data-dir", copy]
    assert prepare_main(["imagenet2012", *flags, *resize]) == 0
    return copy, flags, resize


def test_prepare_data_resized_copy(imagenet_photos, capsys):
    """`dpn-prepare-data --resize-shorter 48 --quality 90`: a TFDS data dir whose records are
    the originals' (same order, labels, names) with images at a 48-pixel shorter side (the small
    one unchanged), metadata saying so, eval crops close to the originals'; a second run
    reuses it; an output dir with a user's file is refused and left as it was."""
    from dpn_jax.cli.prepare_data import main as prepare_main
    from dpn_jax.data.sources import open_dataset

    data_dir, manual, root = imagenet_photos
    copy, flags, resize = resized_copy(imagenet_photos)
    assert f"train on it with --config.data_dir={copy}" in capsys.readouterr().out
    info = pipeline.dataset_info("imagenet2012", data_dir=copy)
    assert (info.num_train_examples, info.num_eval_examples) == (6, 3)
    assert info.prepared == "images pre-resized to a 48-pixel shorter side, JPEG quality 90"
    assert pipeline.dataset_info("imagenet2012", data_dir=data_dir).prepared == ""
    original, resized = (
        open_dataset("imagenet2012", data_dir=d).records("train") for d in (data_dir, copy)
    )
    eval_settings = dict(image_size=42, crop_pct=0.875, interpolation="bicubic")  # resize: 48
    for index in range(len(original)):
        a, b = original[index], resized[index]
        assert (a["label"], a["name"]) == (b["label"], b["name"])
        full, small = decode_image(a["image"], "a"), decode_image(b["image"], "b")
        if min(full.size) <= 48:
            assert b["image"] == a["image"]
            continue
        assert min(small.size) == 48 and b["image"] != a["image"]
        assert abs(small.width / small.height - full.width / full.height) < 0.02
        difference = np.abs(
            eval_crop(small, **eval_settings).astype(int)
            - eval_crop(full, **eval_settings).astype(int)
        )
        assert difference.mean() < 3.0, difference.mean()
    meta_path = next((root / "resized").rglob(PREPARED_FILE))
    meta = json.loads(meta_path.read_text())
    assert meta["shorter_side"] == 48 and meta["quality"] == 90
    assert (meta["images_resized"], meta["images_kept"]) == (4 + 3, 2)
    assert_dataset_info_describes_the_files(meta_path.parent, data_dir)
    stamp = os.stat(meta_path).st_mtime_ns
    assert prepare_main(["imagenet2012", *flags, *resize]) == 0  # reused, not rewritten
    assert os.stat(meta_path).st_mtime_ns == stamp

    user = root / "user"
    (user / meta_path.parent.relative_to(copy)).mkdir(parents=True)
    notes = user / meta_path.parent.relative_to(copy) / "notes.txt"
    notes.write_text("mine")
    resize[-1] = str(user)
    assert prepare_main(["imagenet2012", *flags, *resize]) == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert notes.read_text() == "mine" and os.listdir(notes.parent) == ["notes.txt"]


def assert_dataset_info_describes_the_files(directory, original_data_dir):
    """The copy's dataset_info.json: each split's shard lengths and num_bytes (TFDS's sum of
    the serialized records) are those of its files; the rest is the original's."""
    from array_record.python.array_record_module import ArrayRecordReader

    info = json.loads((directory / "dataset_info.json").read_text())
    original_path = next(Path(original_data_dir).rglob("dataset_info.json"))
    original = json.loads(original_path.read_text())
    assert [s["name"] for s in info["splits"]] == ["train", "validation"]
    for split, before in zip(info["splits"], original["splits"]):
        shards = sorted(directory.glob(f"imagenet2012-{split['name']}.array_record-*"))
        records = [ArrayRecordReader(str(shard)).read_all() for shard in shards]
        assert split["shardLengths"] == [str(len(r)) for r in records]
        assert int(split["numBytes"]) == sum(len(record) for r in records for record in r)
        assert int(split["numBytes"]) < int(before["numBytes"])  # the original's was larger
        before["numBytes"] = split["numBytes"]
    assert info == original


def test_copy_metadata_drops_what_it_cannot_know(tmp_path):
    """A split whose shards were not all rewritten gets num_bytes 0 (TFDS's 'unknown'); a
    dataset also prepared as TFRecord is ArrayRecord only in the copy (its only format)."""
    splits = [
        {"name": name, "numBytes": "1000", "shardLengths": ["2", "3"]} for name in ("train", "test")
    ]
    info = {
        "name": "things",
        "version": "1.0.0",
        "fileFormat": "tfrecord",
        "alternativeFileFormats": ["array_record"],
        "splits": splits,
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    sizes = {"things-train.array_record-00000-of-00002": 30}
    sizes["things-train.array_record-00001-of-00002"] = 12
    describe_copy(tmp_path, {**sizes, "things-test.array_record-00001-of-00002": 5})
    written = json.loads((tmp_path / "dataset_info.json").read_text())
    assert [s.get("numBytes", "0") for s in written["splits"]] == ["42", "0"]
    assert [s["shardLengths"] for s in written["splits"]] == [["2", "3"], ["2", "3"]]
    assert written["fileFormat"] == "array_record" and "alternativeFileFormats" not in written


def test_prepare_data_refuses_bad_resize_settings_first(tmp_path, capsys):
    """Bad --resize-shorter / --quality, or the copy's flags without --resize-shorter, are one
    line, before any preparing (here an unprepared ImageNet without its tars would otherwise be
    the error)."""
    from dpn_jax.cli.prepare_data import main as prepare_main

    for flags in (["--resize-shorter", "0"], ["--resize-shorter", "256", "--quality", "101"]):
        assert prepare_main(["imagenet2012", "--data-dir", str(tmp_path), *flags]) == 1
        error = capsys.readouterr().err.strip()
        assert error.endswith(
            "--resize-shorter must be >= 1 and --quality in [1, 100], got "
            f"{flags[1]} and {flags[3] if len(flags) > 2 else 90}"
        ), error
        assert len(error.splitlines()) == 1
    for flags in (["--quality", "80"], ["--output-data-dir", str(tmp_path / "copy")]):
        assert prepare_main(["imagenet2012", "--data-dir", str(tmp_path), *flags]) == 1
        assert capsys.readouterr().err == (
            "dpn-prepare-data: error: --quality and --output-data-dir are for the resized copy: "
            "add --resize-shorter N\n"
        )
    assert os.listdir(tmp_path) == []


def test_trainer_line_names_the_prepared_images():
    from dpn_jax.train import report

    common = dict(
        arch="dpn68",
        model_kwargs={},
        params={},
        dataset="imagenet2012",
        num_train=6,
        num_eval=3,
        num_classes=1000,
        devices=[type("Device", (), {"platform": "cpu"})()],
        workdir="w",
    )
    line = report.describe_run(**common, prepared="images pre-resized to a 48-pixel shorter side")
    assert "(6 train / 3 eval images, images pre-resized to a 48-pixel shorter side, 1000" in line
    assert "(6 train / 3 eval images, 1000 classes)" in report.describe_run(**common)


def test_images_description_names_the_prepared_copy_and_reduced_decoding():
    prepared = "images pre-resized to a 48-pixel shorter side, JPEG quality 90"
    reduced = "JPEGs decoded at reduced size where the crop allows"
    assert describe_images("", False) == ""
    assert describe_images(prepared, False) == prepared
    assert describe_images("", True) == reduced
    assert describe_images(prepared, True) == f"{prepared}, {reduced}"


@pytest.mark.slow
def test_trainer_decodes_reduced_with_the_config_key_and_says_so(tmp_path, monkeypatch, capsys):
    """`--config.reduced_decode=True` reaches the training and the evaluation pipelines, and
    the run's first line says so (a one-step run on a folder of photo-like JPEGs)."""
    from train_worker import tiny_config

    from dpn_jax.train import trainer

    for split, count in (("train", 8), ("validation", 4)):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(count // 2):
                pixels = photo(96, 72, seed=i + 10 * (label == "b"))
                (tmp_path / "data" / split / label / f"{i}.jpg").write_bytes(jpeg(pixels))
    seen = {}

    def recorded(name, function):
        def record(*args, **kwargs):
            seen[name] = kwargs["reduced_decode"]
            return function(*args, **kwargs)

        return record

    monkeypatch.setattr(pipeline, "eval_batches", recorded("eval", pipeline.eval_batches))
    hooks = trainer.TrainHooks(train_batches=recorded("train", pipeline.train_batches))
    config = tiny_config(
        dataset=f"folder:{tmp_path / 'data'}",
        reduced_decode=True,
        batch_size=8,
        base_batch_size=8,
        eval_batch_size=4,
        num_train_steps=1,
    )
    metrics = trainer.train_and_evaluate(config, tmp_path / "run", hooks)
    assert seen == {"train": True, "eval": True} and metrics["eval_examples"] == 4
    first = capsys.readouterr().out.splitlines()[0]
    assert "(8 train / 4 eval images, JPEGs decoded at reduced size where the crop allows, " in (
        first
    )


def test_evaluate_says_it_reads_the_resized_copy(imagenet_photos, tmp_path, capsys):
    """dpn-evaluate on the pre-resized copy names its settings, as the trainer's first line;
    on the original images it says nothing of the kind."""
    import jax
    from train_worker import TINY

    from dpn_jax.cli.evaluate import main as evaluate_main
    from dpn_jax.data.preprocessing import Preprocessing
    from dpn_jax.factory import create_model
    from dpn_jax.weights.model_dir import ModelDir

    data_dir, _, _ = imagenet_photos
    copy, _, _ = resized_copy(imagenet_photos)
    _, variables = create_model("dpn68", num_classes=1000, rng=jax.random.key(0), **TINY)
    ModelDir(
        architecture="dpn68",
        num_classes=1000,
        model_kwargs=TINY,
        variables=variables,
        preprocessing=Preprocessing(
            input_size=(32, 32),
            crop_pct=0.875,
            interpolation="bicubic",
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
        ),
        source="test",
    ).save(tmp_path / "model")
    capsys.readouterr()
    lines = []
    for where in (copy, data_dir):
        argv = ["--checkpoint", str(tmp_path / "model"), "--dataset", "imagenet2012"]
        argv += ["--data-dir", where, "--batch-size", "4", "--no-progress"]
        assert evaluate_main(argv) == 0
        lines.append(capsys.readouterr().out.strip())
    resized, original = lines
    assert resized.endswith(
        "32px crop 0.875; images pre-resized to a 48-pixel shorter side, JPEG quality 90)"
    ), resized
    assert original.endswith("32px crop 0.875)") and "(3 images, " in original, original
