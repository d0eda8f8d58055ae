"""Input pipeline on data the tests make: digits, tiny image folders, a tiny ILSVRC2012 manual dir
prepared as ArrayRecord, and the same reads in a Python that cannot import TensorFlow."""

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpn_jax.data import pipeline
from dpn_jax.data.folder import FileRecords
from dpn_jax.data.transforms import eval_crop, load_image
from dpn_jax.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
EVAL_KWARGS = dict(crop_pct=1.0, interpolation="bicubic", process_index=0, process_count=1)
TRAIN_KWARGS = dict(interpolation="bicubic", seed=0, process_index=0, process_count=1)


def image_bytes(pixels: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def numbered_image(number: int, size: int = 32) -> np.ndarray:
    """A flat image whose red and green values spell `number`: every crop, resize and flip of
    it (training) and the eval transform keep those values."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = number // 256, number % 256
    return pixels


def numbers_of(images: np.ndarray) -> list[int]:
    """The numbers of numbered images [N, H, W, 3] (uint8), checking each is still flat."""
    assert (images == images[:, :1, :1]).all()
    return list(images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 0, 1])


def eval_numbers(batches) -> list[int]:
    return [n for batch in batches for n in numbers_of(batch["image"][batch["mask"]])]


def write_numbered_folder(
    root: Path, split: str, count: int, classes=("cat", "dog", "zebra"), size: int = 32
) -> None:
    for number in range(count):
        path = root / split / classes[number % len(classes)] / f"{number:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(numbered_image(number, size), "PNG"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train: 3 classes x 4 PNGs; val: 13 numbered PNGs; one corrupt file in each split."""
    root = tmp_path_factory.mktemp("folder")
    write_numbered_folder(root, "train", 12, size=40)
    write_numbered_folder(root, "val", 13)
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
def imagenet(tmp_path_factory):
    """ILSVRC2012_img_train.tar (a tar of per-synset tars of JPEGs) and ILSVRC2012_img_val.tar in
    a manual dir, prepared as ArrayRecord by `prepare` (TensorFlow, once);
    returns (data_dir, manual_dir, the validation JPEGs in name order)."""
    pytest.importorskip("tensorflow")
    from dpn_jax.data.tfds_source import prepare

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
    validation = [
        image_bytes(rng.integers(0, 256, (40 + 9 * i, 50, 3), dtype=np.uint8), "JPEG")
        for i in range(3)
    ]
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
        for i, jpeg in enumerate(validation):
            add_to_tar(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg)
    data_dir = str(root / "tfds")
    prepare("imagenet2012", data_dir=data_dir, manual_dir=str(manual))
    return data_dir, str(manual), validation


def take(batches, count: int) -> list[dict]:
    return [next(batches) for _ in range(count)]


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_digits_info_and_batches():
    info = pipeline.dataset_info("digits")
    assert info == pipeline.DatasetInfo(10, tuple("0123456789"), 1437, 360)
    batches = pipeline.train_batches("digits", batch_size=16, image_size=32, **TRAIN_KWARGS)
    batch = next(batches)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert set(batch["label"]) <= set(range(10)) and len(set(batch["label"])) > 1
    assert batch["image"].min() == 0 and batch["image"].max() > 200  # background and ink
    evaluation = list(pipeline.eval_batches("digits", batch_size=100, image_size=32, **EVAL_KWARGS))
    assert [int(b["mask"].sum()) for b in evaluation] == [100, 100, 100, 60]
    assert all(b["image"].dtype == np.uint8 and b["label"].dtype == np.int32 for b in evaluation)


def test_train_batches_are_deterministic_and_resume_exactly():
    """Batch k is a function of (seed, process, k): the same after set_state, after start_batch,
    across the epoch boundary (1437 // 64 = 22 batches) and with the state JSON round-tripped."""
    kwargs = dict(
        batch_size=64, image_size=32, interpolation="bicubic", process_index=0, process_count=1
    )
    fresh = pipeline.train_batches("digits", seed=3, **kwargs)
    batches = take(fresh, 24)
    state = json.loads(json.dumps(fresh.get_state()))
    assert state["next_batch"] == 24
    batches += take(fresh, 2)
    resumed = pipeline.train_batches("digits", seed=3, **kwargs)
    next(resumed)  # somewhere else first
    resumed.set_state(state)
    assert_same_batches(take(resumed, 2), batches[24:])
    assert resumed.get_state() == fresh.get_state()
    started = pipeline.train_batches("digits", seed=3, start_batch=21, **kwargs)
    assert_same_batches(take(started, 5), batches[21:])
    other_seed = next(pipeline.train_batches("digits", seed=4, **kwargs))
    assert not np.array_equal(other_seed["label"], batches[0]["label"])
    assert not np.array_equal(batches[22]["label"], batches[0]["label"])  # epoch 2 reshuffled
    far = pipeline.train_batches("digits", seed=3, start_batch=10**9, **kwargs)
    assert next(far)["image"].shape == (64, 32, 32, 3)  # O(1): no reading up to there
    for batches_ in (fresh, resumed, started, far):
        batches_.close()


def test_batches_do_not_depend_on_worker_processes():
    """The same batches from grain worker processes (each decodes every other batch), and
    resuming them is exact too: with every host augmentation on (RandAugment, the random
    interpolation), which draw only from the per-example generator."""
    augment = dict(interpolation="random", aa="rand-m9-mstd0.5-inc1")
    kwargs = dict(batch_size=32, image_size=24, **{**TRAIN_KWARGS, **augment})
    expected = take(pipeline.train_batches("digits", **kwargs), 5)
    workers = pipeline.train_batches("digits", num_workers=2, **kwargs)
    assert_same_batches(take(workers, 3), expected[:3])
    state = workers.get_state()
    workers.set_state({**state, "next_batch": 1})
    assert_same_batches(take(workers, 4), expected[1:])
    workers.close()
    evaluation = pipeline.eval_batches(
        "digits", batch_size=128, image_size=24, num_workers=1, **EVAL_KWARGS
    )
    assert_same_batches(
        list(evaluation),
        list(pipeline.eval_batches("digits", batch_size=128, image_size=24, **EVAL_KWARGS)),
    )


def test_resume_reads_nothing_before_its_position(tmp_path, monkeypatch):
    """Restoring at batch 50 (example 100 of a 200-image epoch) reads none of the 100 files of
    batches 0-49, and gives batch 50."""
    write_numbered_folder(tmp_path, "train", 200, size=8)
    kwargs = dict(batch_size=2, image_size=8, **TRAIN_KWARGS)
    fresh = pipeline.train_batches(f"folder:{tmp_path}", **kwargs)
    before = take(fresh, 50)
    expected = next(fresh)
    fresh.close()
    seen = {n for batch in before for n in numbers_of(batch["image"])}
    assert len(seen) == 100  # one epoch's first half: no repeats

    read: list[str] = []
    original = FileRecords.__getitem__

    def logged(self, index):
        read.append(self.paths[index])
        return original(self, index)

    monkeypatch.setattr(FileRecords, "__getitem__", logged)
    resumed = pipeline.train_batches(f"folder:{tmp_path}", **kwargs)
    resumed.set_state({**resumed.get_state(), "next_batch": 50})
    assert_same_batches([next(resumed)], [expected])
    resumed.close()
    read_numbers = {int(Path(path).stem) for path in read}
    assert read_numbers and not read_numbers & seen


def test_processes_train_on_disjoint_shards(tmp_path):
    write_numbered_folder(tmp_path, "train", 30, size=8)
    shards = []
    for process in range(3):
        batches = pipeline.train_batches(
            f"folder:{tmp_path}",
            batch_size=5,
            image_size=8,
            interpolation="bilinear",
            seed=0,
            process_index=process,
            process_count=3,
        )
        shards.append(sorted(n for b in take(batches, 2) for n in numbers_of(b["image"])))
        batches.close()
    listing = sorted(range(30), key=lambda n: (n % 3, n))  # by class folder, then file name
    assert shards == [sorted(listing[0:10]), sorted(listing[10:20]), sorted(listing[20:30])]


@pytest.mark.parametrize(
    "batch_size, process_count", [(4, 1), (6, 2), (8, 3), (1, 5), (32, 2), (4, 16)]
)
def test_eval_covers_every_example_once(image_folder, batch_size, process_count):
    found = []
    num_batches = set()
    for process in range(process_count):
        batches = list(
            pipeline.eval_batches(
                f"folder:{image_folder}",
                batch_size=batch_size,
                image_size=32,
                crop_pct=1.0,
                interpolation="bicubic",
                process_index=process,
                process_count=process_count,
            )
        )
        for batch in batches:
            assert set(batch) == {"image", "label", "mask"}
            assert batch["image"].shape == (batch_size, 32, 32, 3)
            assert batch["mask"].shape == batch["label"].shape == (batch_size,)
        num_batches.add(len(batches))
        found += eval_numbers(batches)
    assert sorted(found) == list(range(13))  # the corrupt file is skipped, nothing else
    assert len(num_batches) == 1  # processes stay in step


def test_folder_labels_classes_and_corrupt_files(image_folder, caplog):
    spec = f"folder:{image_folder}"
    info = pipeline.dataset_info(spec)
    assert info.class_names == ("cat", "dog", "zebra")
    assert (info.num_train_examples, info.num_eval_examples) == (13, 14)  # incl. corrupt ones
    with caplog.at_level(logging.WARNING):
        batches = list(pipeline.eval_batches(spec, batch_size=8, image_size=32, **EVAL_KWARGS))
    broken = image_folder / "val" / "cat" / "broken.png"
    assert f"skipping undecodable image {broken} (1 so far): " in caplog.text
    assert "skipped 1 of 14" in caplog.text
    labels = np.concatenate([batch["label"][batch["mask"]] for batch in batches])
    assert list(labels) == [number % 3 for number in eval_numbers(batches)]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train = pipeline.train_batches(spec, batch_size=8, image_size=24, **TRAIN_KWARGS)
        epochs = take(train, 8)  # about five passes over the 13 files
    numbers = [n for batch in epochs for n in numbers_of(batch["image"])]
    assert set(numbers) == set(range(12))
    for batch in epochs:
        assert list(batch["label"]) == [n % 3 for n in numbers_of(batch["image"])]
    broken = image_folder / "train" / "dog" / "broken.jpg"
    warnings = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    why = "not an image Pillow can read"
    assert warnings == [f"skipping undecodable image {broken} (1 so far): {why}"]  # named once


def test_a_dataset_without_decodable_training_images_fails_at_once(tmp_path):
    for number in range(3):
        path = tmp_path / "train" / f"class{number}" / f"{number}.jpg"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"\xff\xd8\xff truncated")
    for num_workers in (0, 1):  # the error crosses from a worker process unchanged
        batches = pipeline.train_batches(
            f"folder:{tmp_path}",
            batch_size=2,
            image_size=8,
            num_workers=num_workers,
            **TRAIN_KWARGS,
        )
        with pytest.raises(
            DataError,
            match=r"train: no training image decodes \(50 tried in a "
            r"row, 3 files; the last, .*\.jpg: not an image",
        ):
            next(batches)
        batches.close()


def test_imagenet2012_prepared_as_array_record(imagenet):
    data_dir, _, validation = imagenet
    info = pipeline.dataset_info("imagenet2012", data_dir=data_dir)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 6, 3)
    assert info.class_names[:2] == tuple(SYNSETS)
    halves = pipeline.dataset_info(
        "tfds:imagenet2012", data_dir=data_dir, train_split="train[:50%]", eval_split="train[50%:]"
    )
    assert (halves.num_train_examples, halves.num_eval_examples) == (3, 3)
    train = pipeline.train_batches(
        "imagenet2012", data_dir=data_dir, batch_size=4, image_size=32, **TRAIN_KWARGS
    )
    for batch in take(train, 3):
        assert batch["image"].shape == (4, 32, 32, 3) and set(batch["label"]) <= {0, 1}
    train.close()
    half = pipeline.train_batches(
        "imagenet2012",
        data_dir=data_dir,
        batch_size=3,
        image_size=32,
        train_split="train[:50%]",
        **TRAIN_KWARGS,
    )
    assert half.get_state()["split_size"] == 3
    half.close()
    eval_config = dict(image_size=32, crop_pct=0.875, interpolation="bicubic")
    batches = list(
        pipeline.eval_batches(
            "tfds:imagenet2012",
            data_dir=data_dir,
            batch_size=2,
            process_index=0,
            process_count=1,
            **eval_config,
        )
    )
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert sorted(labels) == sorted(info.class_names.index(s) for s in VALIDATION_SYNSETS)
    for image, label in zip(images, labels):  # the very transform inference uses
        jpeg = validation[VALIDATION_SYNSETS.index(info.class_names[label])]
        np.testing.assert_array_equal(image, eval_crop(load_image(io.BytesIO(jpeg)), **eval_config))


def test_unprepared_tfds_datasets_name_the_command(tmp_path, imagenet, capsys):
    from dpn_jax.cli.prepare_data import main as prepare_main

    _, manual_dir, _ = imagenet
    empty = str(tmp_path / "empty")
    with pytest.raises(
        DataError,
        match=f"imagenet2012 is not prepared in {empty}; prepare it "
        f"once .*: dpn-prepare-data imagenet2012 --data-dir "
        f"{empty} --manual-dir {manual_dir}$",
    ):
        pipeline.dataset_info("imagenet2012", data_dir=empty, manual_dir=manual_dir)
    with pytest.raises(DataError, match="no such TFDS dataset"):
        pipeline.dataset_info("tfds:no_such_dataset_xyz", data_dir=empty)
    assert prepare_main(["imagenet2012", "--data-dir", empty]) == 1  # no tars in the manual dir
    assert capsys.readouterr().err.startswith(
        f"dpn-prepare-data: error: imagenet2012 is built from files you download yourself, and "
        f"{empty}/downloads/manual is missing or empty (pass --manual-dir): manual_dir should "
        "contain two files: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar."
    )
    assert not os.path.exists(empty)  # neither reading nor the refused preparing wrote anything


def test_tfrecord_only_dataset_names_the_command(tmp_path, imagenet):
    """A dataset prepared the old way (TFRecord) is refused with the command that prepares an
    ArrayRecord copy; `dpn-prepare-data` refuses to touch it."""
    import tensorflow_datasets as tfds

    from dpn_jax.cli.prepare_data import main as prepare_main

    _, manual_dir, _ = imagenet
    old = str(tmp_path / "tfrecord")
    tfds.builder("imagenet2012", data_dir=old).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    command = (
        f"dpn-prepare-data imagenet2012 --data-dir NEW_DATA_DIR --download-dir {old}/downloads"
    )
    with pytest.raises(DataError, match=f"prepared as tfrecord only.*: {command}$"):
        pipeline.dataset_info("imagenet2012", data_dir=old)
    listing = sorted(p.name for p in Path(old).rglob("*"))
    assert prepare_main(["imagenet2012", "--data-dir", old]) == 1
    assert sorted(p.name for p in Path(old).rglob("*")) == listing


def test_bad_specs_and_arguments_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="unknown dataset spec 'mnist'"):
        pipeline.dataset_info("mnist")
    with pytest.raises(DataError, match="no such directory"):
        pipeline.dataset_info(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="splits"):
        pipeline.dataset_info("digits", eval_split="test")
    with pytest.raises(ConfigError, match="batch size"):
        pipeline.train_batches("digits", batch_size=0, image_size=32, **TRAIN_KWARGS)
    with pytest.raises(ConfigError, match="interpolation 'cubic'"):
        pipeline.train_batches(
            "digits",
            batch_size=4,
            image_size=32,
            interpolation="cubic",
            seed=0,
            process_index=0,
            process_count=1,
        )
    with pytest.raises(ConfigError, match="crop_pct"):
        pipeline.eval_batches(
            "digits",
            batch_size=4,
            image_size=32,
            crop_pct=0.0,
            interpolation="bicubic",
            process_index=0,
            process_count=1,
        )
    with pytest.raises(DataError, match="none for process 4 of 5"):
        write_numbered_folder(tmp_path / "small", "train", 4, size=8)
        pipeline.train_batches(
            f"folder:{tmp_path / 'small'}",
            batch_size=1,
            image_size=8,
            interpolation="bilinear",
            seed=0,
            process_index=4,
            process_count=5,
        )
    batches = pipeline.train_batches("digits", batch_size=8, image_size=32, **TRAIN_KWARGS)
    other = pipeline.train_batches("digits", batch_size=16, image_size=32, **TRAIN_KWARGS)
    with pytest.raises(DataError, match=r"another training stream \(batch_size 16 \(now 8\)\)"):
        batches.set_state(other.get_state())


def test_evaluation_only_folder_has_no_train_examples(tmp_path):
    write_numbered_folder(tmp_path, "val", 3, classes=("class0", "class1", "class2"))
    info = pipeline.dataset_info(f"folder:{tmp_path}")
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (0, 3, 3)


HIDE_TENSORFLOW = '''
import sys

class HideTensorFlow:
    """Wraps a finder: `tensorflow` and its submodules are not found."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        find_spec = getattr(self.finder, "find_spec", None)
        return find_spec(name, path, target) if find_spec else None

    def __getattr__(self, name):
        return getattr(self.finder, name)

sys.meta_path[:] = [HideTensorFlow(finder) for finder in sys.meta_path]
'''

WITHOUT_TENSORFLOW = """
import json, sys
import numpy as np
from dpn_jax.data import pipeline
from dpn_jax.errors import DataError
from dpn_jax.infer.predict import Predictor  # inference imports no TensorFlow either

data_dir, empty = sys.argv[1:3]
out = {}
for spec, kwargs in (("digits", {}), ("imagenet2012", {"data_dir": data_dir})):
    info = pipeline.dataset_info(spec, **kwargs)
    batches = pipeline.train_batches(spec, batch_size=4, image_size=16, interpolation="bilinear",
                                     seed=0, process_index=0, process_count=1, **kwargs)
    images = next(batches)["image"]
    batches.close()
    evaluation = list(pipeline.eval_batches(spec, batch_size=64, image_size=16, crop_pct=0.9,
                                            interpolation="bicubic", process_index=0,
                                            process_count=1, **kwargs))
    out[spec] = [info.num_train_examples, list(images.shape),
                 int(sum(b["mask"].sum() for b in evaluation))]
try:
    pipeline.dataset_info("imagenet2012", data_dir=empty)
except DataError as error:
    out["unprepared"] = str(error)
out["tensorflow"] = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
print(json.dumps(out))
"""


@pytest.mark.parametrize("tensorflow", ["hidden", "installed"])
def test_reading_needs_no_tensorflow(tmp_path, imagenet, tensorflow):
    """Training, evaluation and inference read data in a Python where `import tensorflow` fails
    (hidden from every import finder; tfds checks sys.modules, so it cannot simply be set to None
    there), and never import it where it is installed."""
    data_dir, _, _ = imagenet
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    if tensorflow == "hidden":
        (tmp_path / "sitecustomize.py").write_text(HIDE_TENSORFLOW)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
        check = subprocess.run(
            [sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True
        )
        assert "No module named 'tensorflow'" in check.stderr
    empty = str(tmp_path / "empty")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WITHOUT_TENSORFLOW), data_dir, empty],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["digits"] == [1437, [4, 16, 16, 3], 360]
    assert out["imagenet2012"] == [6, [4, 16, 16, 3], 3]
    assert out["unprepared"].endswith(f"dpn-prepare-data imagenet2012 --data-dir {empty}")
    assert out["tensorflow"] == []
    if tensorflow == "installed":
        return
    prepare = subprocess.run(
        [sys.executable, "-m", "dpn_jax.cli.prepare_data", "imagenet2012", "--data-dir", empty],
        env=env,
        capture_output=True,
        text=True,
    )
    assert prepare.returncode == 1
    assert prepare.stderr.strip().splitlines() == [
        (
            "dpn-prepare-data: error: preparing a TFDS dataset needs TensorFlow: "
            "pip install 'dpn_jax[prepare]'"
        )
    ]
