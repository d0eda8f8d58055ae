"""Input pipeline on data the tests make: digits, a tiny image folder, a tiny ILSVRC2012 manual dir."""
import io
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from dpn_jax.data import pipeline
from dpn_jax.data.sources import even_shard_bounds, open_reader
from dpn_jax.data.transforms import eval_crop, load_image

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EVAL_KWARGS = dict(crop_pct=1.0, interpolation="bicubic")


def image_bytes(pixels: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def numbered_image(number: int, size: int = 32) -> np.ndarray:
    """A flat image whose red and green values spell `number` (survives PNG, and an eval
    transform without resize when image_size == size and crop_pct == 1)."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = number // 256, number % 256
    return pixels


def numbers_in(batches) -> list[int]:
    """The numbered images an eval iterator yielded, padding left out by the mask."""
    found = []
    for batch in batches:
        pixels = batch["image"][batch["mask"]].astype(int)
        found += list(pixels[:, 0, 0, 0] * 256 + pixels[:, 0, 0, 1])
    return found


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train: 3 classes x 4 PNGs; val: 13 numbered PNGs; one corrupt file in each split."""
    root = tmp_path_factory.mktemp("folder")
    classes = ["cat", "dog", "zebra"]
    for number in range(12):
        path = root / "train" / classes[number % 3] / f"{number:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(numbered_image(number, size=40), "PNG"))
    for number in range(13):
        path = root / "val" / classes[number % 3] / f"{number:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(numbered_image(number), "PNG"))
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "val" / "cat" / "broken.png").write_bytes(b"\x89PNG truncated")
    (root / "val" / "cat" / "notes.txt").write_text("not an image, not listed")
    return root


SYNSETS = ["n01440764", "n01443537"]  # the first two ImageNet classes (labels 0 and 1)
# Labels TFDS assigns to the first three validation images (its validation_labels.txt).
VALIDATION_SYNSETS = ["n01751748", "n09193705", "n02105855"]


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def imagenet_dirs(tmp_path_factory):
    """ILSVRC2012_img_train.tar (a tar of per-synset tars of JPEGs) and ILSVRC2012_img_val.tar,
    in a manual dir; returns (data_dir, manual_dir, the validation JPEGs in name order)."""
    root = tmp_path_factory.mktemp("imagenet")
    manual = root / "manual"
    manual.mkdir()
    rng = np.random.default_rng(0)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
        for synset in SYNSETS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as synset_tar:
                for i in range(3):
                    pixels = rng.integers(0, 256, (36 + 4 * i, 48, 3), dtype=np.uint8)
                    add_to_tar(synset_tar, f"{synset}_{i}.JPEG", image_bytes(pixels, "JPEG"))
            add_to_tar(train, f"{synset}.tar", inner.getvalue())
    validation = [image_bytes(rng.integers(0, 256, (40 + 9 * i, 50, 3), dtype=np.uint8), "JPEG")
                  for i in range(3)]
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
        for i, jpeg in enumerate(validation):
            add_to_tar(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg)
    return str(root / "tfds"), str(manual), validation


def test_digits_info_and_batches():
    info = pipeline.dataset_info("digits")
    assert info == pipeline.DatasetInfo(10, tuple("0123456789"), 1437, 360)
    train = pipeline.train_batches("digits", batch_size=16, image_size=32)
    batch = next(train)
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert set(batch["label"].ravel()) <= set(range(10)) and len(set(batch["label"].ravel())) > 1
    # uint8 pixels: background 0, ink near 255
    assert batch["image"].min() == 0 and batch["image"].max() > 200


def test_train_iterator_is_deterministic_and_resumes_exactly():
    kwargs = dict(batch_size=64, image_size=32)
    fresh = pipeline.train_batches("digits", seed=3, **kwargs)
    batches = [next(fresh) for _ in range(26)]  # 1437 / 64: step 25 is in the second epoch
    resumed = pipeline.train_batches("digits", seed=3, **kwargs)
    resumed.set_state({"batches": 24})
    for expected in batches[24:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])
    other_seed = next(pipeline.train_batches("digits", seed=4, **kwargs))
    assert not np.array_equal(other_seed["label"], batches[0]["label"])
    # epochs are reshuffled: the second epoch does not start like the first
    assert not np.array_equal(batches[22]["label"], batches[0]["label"])


@pytest.mark.parametrize("spec", ["digits", "folder"])
def test_shards_are_disjoint_and_cover_the_split(spec, image_folder):
    reader = open_reader(f"folder:{image_folder}" if spec == "folder" else spec)
    for split in ("train", reader.default_eval_split):
        everything = [ex["id"] for ex in reader.shard(split, 0, 1).examples.as_numpy_iterator()]
        for process_count in (2, 3, 5):
            shards = [[ex["id"] for ex in reader.shard(split, i, process_count)
                       .examples.as_numpy_iterator()] for i in range(process_count)]
            assert sorted(sum(shards, [])) == sorted(everything)
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_tfds_shards_are_the_even_split_slices(imagenet_dirs):
    """TFDS shards (`split_for_jax_process`) are contiguous slices with the same bounds the
    in-memory readers use, so all specs shard alike."""
    data_dir, manual_dir, _ = imagenet_dirs
    reader = open_reader("imagenet2012", data_dir=data_dir, manual_dir=manual_dir)
    for split, process_counts in [("train", (2, 4, 5)), ("validation", (2, 3))]:
        everything = [ex["id"] for ex in reader.shard(split, 0, 1).examples.as_numpy_iterator()]
        for count in process_counts:
            for index in range(count):
                start, end = even_shard_bounds(len(everything), index, count)
                shard = reader.shard(split, index, count)
                ids = [ex["id"] for ex in shard.examples.as_numpy_iterator()]
                assert ids == everything[start:end] and shard.num_examples == end - start
                assert shard.largest_shard_size == -(-len(everything) // count)


@pytest.mark.parametrize("batch_size, process_count",
                         [(4, 1), (6, 2), (8, 3), (1, 5), (32, 2), (4, 16)])
def test_eval_covers_every_example_once(image_folder, batch_size, process_count):
    found = []
    num_batches = set()
    for process in range(process_count):
        batches = list(pipeline.eval_batches(
            f"folder:{image_folder}", batch_size=batch_size, image_size=32,
            process_index=process, process_count=process_count, **EVAL_KWARGS))
        for batch in batches:
            assert set(batch) == {"image", "label", "mask"}
            assert batch["image"].shape == (batch_size, 32, 32, 3)
            assert batch["mask"].shape == batch["label"].shape == (batch_size,)
        num_batches.add(len(batches))
        found += numbers_in(batches)
    assert sorted(found) == list(range(13))  # the corrupt file is skipped, nothing else
    assert len(num_batches) == 1  # processes stay in step


def test_folder_labels_classes_and_corrupt_files(image_folder, caplog):
    spec = f"folder:{image_folder}"
    info = pipeline.dataset_info(spec)
    assert info.class_names == ("cat", "dog", "zebra")
    assert (info.num_train_examples, info.num_eval_examples) == (13, 14)  # incl. corrupt ones
    with caplog.at_level(logging.WARNING):
        batches = list(pipeline.eval_batches(spec, batch_size=8, image_size=32, **EVAL_KWARGS))
    assert "skipped 1 of 14" in caplog.text and "broken.png" in caplog.text
    labels = np.concatenate([batch["label"][batch["mask"]] for batch in batches])
    numbers = numbers_in(batches)
    assert list(labels) == [number % 3 for number in numbers]
    first_epoch = next(pipeline.train_batches(
        spec, batch_size=12, image_size=24, shuffle_buffer_size=1))["label"].ravel()
    assert list(first_epoch) != sorted(first_epoch)  # the whole listing is shuffled, not a window
    train = pipeline.train_batches(spec, batch_size=8, image_size=24)
    for _ in range(4):  # several epochs past the corrupt file
        batch = next(train)
        assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.uint8


def test_imagenet2012_from_manual_dir(imagenet_dirs):
    data_dir, manual_dir, validation = imagenet_dirs
    info = pipeline.dataset_info("imagenet2012", data_dir=data_dir, manual_dir=manual_dir)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 6, 3)
    assert info.class_names[:2] == tuple(SYNSETS)
    halves = pipeline.dataset_info("tfds:imagenet2012", data_dir=data_dir,
                                         train_split="train[:50%]", eval_split="train[50%:]")
    assert (halves.num_train_examples, halves.num_eval_examples) == (3, 3)
    train = pipeline.train_batches("imagenet2012", data_dir=data_dir, manual_dir=manual_dir,
                                   batch_size=4, image_size=32)
    for _ in range(3):
        batch = next(train)
        assert batch["image"].shape == (4, 32, 32, 3)
        assert set(batch["label"].ravel()) <= {0, 1}
    eval_config = dict(image_size=32, crop_pct=0.875, interpolation="bicubic")
    batches = list(pipeline.eval_batches("tfds:imagenet2012", data_dir=data_dir, batch_size=2,
                                         **eval_config))
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert sorted(labels) == sorted(info.class_names.index(s) for s in VALIDATION_SYNSETS)
    for image, label in zip(images, labels):  # the very transform inference uses
        jpeg = validation[VALIDATION_SYNSETS.index(info.class_names[label])]
        expected = eval_crop(load_image(io.BytesIO(jpeg)), **eval_config)
        np.testing.assert_array_equal(image, expected)


def test_bad_specs_and_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset spec 'mnist'"):
        pipeline.dataset_info("mnist")
    with pytest.raises(ValueError, match="no such directory"):
        pipeline.dataset_info(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="splits"):
        pipeline.dataset_info("digits", eval_split="test")



@pytest.mark.parametrize("height, width", [(375, 500), (500, 100), (8, 8)])
def test_random_crop_windows_follow_timm(height, width):
    """Windows lie inside the image and their area/aspect distribution is timm's
    (RandomResizedCropAndInterpolation.get_params, sampled with a fixed seed)."""
    import random
    tf = pytest.importorskip("tensorflow")
    transforms = pytest.importorskip("timm.data.transforms")
    window = tf.function(pipeline._random_crop_window)
    ours = np.array([window(tf.constant([height, width, 3]), tf.constant([seed, 1], tf.int64))
                     .numpy() for seed in range(300)])
    top, left, crop_h, crop_w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (crop_h >= 1).all() and (crop_w >= 1).all()
    assert (top + crop_h <= height).all() and (left + crop_w <= width).all()
    random.seed(0)
    image = Image.new("RGB", (width, height))
    theirs = np.array([transforms.RandomResizedCropAndInterpolation.get_params(
        image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)])
    for q in (10, 50, 90):
        ours_q, theirs_q = (np.percentile(w[:, 2] * w[:, 3] / (height * width), q)
                            for w in (ours, theirs))
        assert abs(ours_q - theirs_q) < 0.05, (q, ours_q, theirs_q)


def test_evaluation_only_folder_has_no_train_examples(tmp_path):
    for number in range(3):
        path = tmp_path / "val" / f"class{number}" / f"{number}.png"
        path.parent.mkdir(parents=True)
        path.write_bytes(image_bytes(numbered_image(number), "PNG"))
    info = pipeline.dataset_info(f"folder:{tmp_path}")
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (0, 3, 3)
