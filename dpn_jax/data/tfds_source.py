"""`imagenet2012` and `tfds:NAME`: any TFDS dataset with (image, label) supervised keys.

Reading needs no TensorFlow: the dataset must be prepared once as ArrayRecord, which TFDS's
data source (`builder.as_data_source`, as `tfds.data_source`) reads with random access; images
stay encoded (`SkipDecoding`). Preparing
(downloading, or for ImageNet building from the ILSVRC2012 tars in the manual dir) needs
TensorFlow and is `prepare()`, behind `dpn-prepare-data`; training and evaluation never prepare,
they say which command would.
"""

from __future__ import annotations

import logging
import os
import shlex

import tensorflow_datasets as tfds

from dpn_jax.data.records import Record
from dpn_jax.data.resized import (
    default_output_root,
    describe_prepared,
    read_prepared,
    write_resized_copy,
)
from dpn_jax.errors import DataError

log = logging.getLogger(__name__)

ARRAY_RECORD = tfds.core.file_adapters.FileFormat.ARRAY_RECORD


class TfdsRecords:
    """A prepared split (or slice, e.g. 'train[:10%]') as records."""

    def __init__(self, source, image_key: str, label_key: str, prefix: str, has_file_name: bool):
        self.source, self.image_key, self.label_key = source, image_key, label_key
        self.prefix, self.has_file_name = prefix, has_file_name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Record:
        example = self.source[index]
        name = example["file_name"].decode() if self.has_file_name else f"{self.prefix}[{index}]"
        return Record(image=example[self.image_key], label=int(example[self.label_key]), name=name)


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"tfds:{name}: no such TFDS dataset (see https://www.tensorflow.org/datasets/catalog)"
        ) from None


def prepare_command(
    spec: str,
    *,
    data_dir: str | None = None,
    download_dir: str | None = None,
    manual_dir: str | None = None,
) -> str:
    """The `dpn-prepare-data` command line that prepares `spec` with these directories."""
    words = ["dpn-prepare-data", spec]
    for flag, value in (
        ("--data-dir", data_dir),
        ("--download-dir", download_dir),
        ("--manual-dir", manual_dir),
    ):
        if value:
            words += [flag, value]
    return shlex.join(words)


class TfdsDataset:
    def __init__(
        self, name: str, *, spec: str, data_dir: str | None = None, manual_dir: str | None = None
    ):
        self.name, self.spec = name, spec
        self.builder = _builder(name, data_dir)
        where = os.fspath(self.builder.data_dir_root)
        if not self.builder.is_prepared():
            command = prepare_command(spec, data_dir=data_dir, manual_dir=manual_dir)
            raise DataError(
                f"{spec} is not prepared in {where}; prepare it once (needs TensorFlow): {command}"
            )
        info = self.builder.info
        if ARRAY_RECORD not in info.available_file_formats():
            raise DataError(
                f"{spec} in {where} is prepared as {info.file_format.value} only, and dpn_jax "
                "reads ArrayRecord; prepare a copy once into another data dir (needs "
                "TensorFlow; reuses the downloads): "
                + prepare_command(
                    spec,
                    data_dir="NEW_DATA_DIR",
                    download_dir=os.path.join(where, "downloads"),
                    manual_dir=manual_dir,
                )
            )
        if info.supervised_keys is None or len(info.supervised_keys) != 2:
            raise DataError(f"{spec} has no (image, label) supervised keys")
        self.image_key, self.label_key = info.supervised_keys
        if not isinstance(info.features[self.image_key], tfds.features.Image):
            raise DataError(f"{spec}: feature {self.image_key!r} is not an image")
        self.class_names = tuple(info.features[self.label_key].names)
        self.prepared = describe_prepared(read_prepared(self.builder.data_dir))

    @property
    def default_eval_split(self) -> str:
        for name in ("validation", "test"):
            if name in self.builder.info.splits:
                return name
        raise DataError(
            f"{self.spec} has only splits {sorted(self.builder.info.splits)}; pass "
            "eval_split (and train_split), e.g. 'train[90%:]'"
        )

    def num_examples(self, split: str) -> int:
        try:
            return self.builder.info.splits[split].num_examples
        except (KeyError, ValueError, AssertionError):
            raise DataError(
                f"{self.spec} has splits {sorted(self.builder.info.splits)}, not "
                f"{split!r} (slices like 'train[:50%]' are fine)"
            ) from None

    def records(self, split: str) -> TfdsRecords:
        self.num_examples(split)  # a clear error for an unknown split
        source = self.builder.as_data_source(
            split=split, decoders={self.image_key: tfds.decode.SkipDecoding()}
        )
        return TfdsRecords(
            source,
            self.image_key,
            self.label_key,
            f"{self.spec} {split}",
            has_file_name="file_name" in self.builder.info.features,
        )


def prepare(
    spec: str,
    *,
    data_dir: str | None = None,
    download_dir: str | None = None,
    manual_dir: str | None = None,
) -> str:
    """Download (or build from the manual dir) and write `spec` as ArrayRecord, once.

    Returns the dataset's directory. Needs TensorFlow (TFDS builders use it); it is kept off
    any GPU. A dataset already prepared as ArrayRecord is left as it is.
    """
    kind, _, arg = spec.partition(":")
    if not (spec == "imagenet2012" or (kind == "tfds" and arg)):
        raise DataError(
            f"{spec!r} is not a TFDS spec ('imagenet2012' or 'tfds:NAME'); "
            "'digits' and 'folder:PATH' need no preparing"
        )
    try:
        import tensorflow as tf
    except ImportError:
        raise DataError(
            "preparing a TFDS dataset needs TensorFlow: pip install 'dpn_jax[prepare]'"
        ) from None
    tf.config.set_visible_devices([], "GPU")  # TensorFlow only writes files here
    builder = _builder(arg or spec, data_dir)
    if builder.is_prepared():
        if ARRAY_RECORD in builder.info.available_file_formats():
            log.info("%s is already prepared as ArrayRecord in %s", spec, builder.data_dir)
            return builder.data_dir
        where = os.fspath(builder.data_dir_root)
        raise DataError(
            f"{spec} in {where} is prepared as {builder.info.file_format.value} only, and TFDS "
            "keeps one format per data dir; prepare into another one (reusing the downloads): "
            + prepare_command(
                spec,
                data_dir="NEW_DATA_DIR",
                download_dir=os.path.join(where, "downloads"),
                manual_dir=manual_dir,
            )
        )
    download_dir = download_dir or os.path.join(builder.data_dir_root, "downloads")
    manual_dir = manual_dir or os.path.join(download_dir, "manual")
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if instructions and not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
        raise DataError(
            f"{spec} is built from files you download yourself, and {manual_dir} is "
            f"missing or empty (pass --manual-dir): {' '.join(instructions.split())}"
        )
    builder.download_and_prepare(
        download_dir=download_dir,
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
    )
    return builder.data_dir


def prepare_resized(
    spec: str,
    *,
    data_dir: str | None,
    shorter: int,
    quality: int,
    output_data_dir: str | None = None,
) -> tuple[str, str]:
    """Write the prepared `spec`'s copy with pre-resized images (`dpn_jax.data.resized`);
    returns (the copy's data dir, its dataset directory)."""
    dataset = TfdsDataset(spec.partition(":")[2] or spec, spec=spec, data_dir=data_dir)
    builder = dataset.builder
    root = os.fspath(builder.data_dir_root)
    output_root = output_data_dir or default_output_root(root, shorter, quality)
    relative = os.path.relpath(builder.data_dir, root)
    where = write_resized_copy(
        builder.data_dir,
        os.path.join(output_root, relative),
        image_key=dataset.image_key,
        shorter=shorter,
        quality=quality,
    )
    return output_root, where
