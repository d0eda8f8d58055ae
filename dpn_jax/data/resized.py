"""A prepared TFDS dataset's copy with its images pre-resized: `dpn-prepare-data --resize-shorter`.

Decoding dominates the host's cost per training image, and it grows with the stored image's
pixels, not the crop's. So a copy whose JPEGs are re-encoded at a shorter side N (never
upscaled, aspect kept, Pillow's bicubic as timm's eval resize, JPEG quality Q) feeds more
images per core. The crops' scale and aspect distributions are relative to the image and do not
change; what changes is the resolution a small crop is taken from, and the re-encoding's loss.

The copy is its own TFDS data directory (train with `data_dir` set to it): the dataset's
metadata files are copied, each ArrayRecord shard is rewritten record by record with only the
image bytes replaced (an image already small enough, or one that does not decode, keeps its
bytes), `dataset_info.json` is made to describe the copy (`describe_copy`), and
`PREPARED_FILE` records N, Q and the source. It is written atomically, and an
existing directory is left alone (reused when it is ours with the same settings).
Rewriting parses the records as tf.train.Example, so it needs TensorFlow, like preparing;
reading the copy does not.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from dpn_jax.data.transforms import UndecodableImage, decode_image
from dpn_jax.errors import ConfigError, DataError
from dpn_jax.system.files import NotOurs, atomic_output

PREPARED_FILE = "dpn_jax_prepared.json"
DATASET_INFO_FILE = "dataset_info.json"  # TFDS's metadata of a dataset version directory
ARRAY_RECORD = "array_record"  # TFDS's name of the format, and its shards' file suffix
PREPARED_KIND = "dpn_jax resized dataset"
RESIZE_FILTER = "bicubic"
DEFAULT_QUALITY = 90
SHARD_MARK = f".{ARRAY_RECORD}-"  # TFDS's shard names: NAME-SPLIT.array_record-00000-of-00004
SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}$")  # any format's shard, the ArrayRecord ones too


def resized_jpeg(encoded: bytes, name: str, shorter: int, quality: int) -> bytes:
    """`encoded` re-encoded as JPEG at quality `quality` with its shorter side `shorter` (EXIF
    orientation applied, as the pipeline would); the same bytes if it is no larger than that
    or does not decode (the pipeline then skips it as before)."""
    try:
        image = decode_image(encoded, name)
    except UndecodableImage:
        return encoded
    width, height = image.size
    short = min(width, height)
    if short <= shorter:
        return encoded
    size = (max(1, round(width * shorter / short)), max(1, round(height * shorter / short)))
    size = (shorter, size[1]) if width == short else (size[0], shorter)
    resized = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    resized.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def check_resize_settings(shorter: int, quality: int) -> None:
    """ConfigError unless the shorter side is >= 1 and the quality in [1, 100]."""
    if shorter < 1 or not 1 <= quality <= 100:
        raise ConfigError(
            f"--resize-shorter must be >= 1 and --quality in [1, 100], got {shorter} and {quality}"
        )


def read_prepared(dataset_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The resize settings recorded in a dataset directory, or None for the original images."""
    try:
        meta = json.loads((Path(dataset_dir) / PREPARED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == PREPARED_KIND else None


def describe_prepared(meta: dict[str, Any] | None) -> str:
    """How a dataset's images were prepared, for the trainer's first line ('' for originals)."""
    if not meta:
        return ""
    return (
        f"images pre-resized to a {meta['shorter_side']}-pixel shorter side, JPEG quality "
        f"{meta['quality']}"
    )


def describe_images(prepared: str, reduced_decode: bool) -> str:
    """How a run's images are read, for its first line: `prepared` (`describe_prepared`'s) and
    whether JPEGs are decoded at reduced size (the pipeline's `reduced_decode`); '' for neither."""
    reduced = "JPEGs decoded at reduced size where the crop allows" if reduced_decode else ""
    return ", ".join(part for part in (prepared, reduced) if part)


def default_output_root(data_dir_root: str, shorter: int, quality: int) -> str:
    """Where the copy goes by default: a TFDS data directory inside the original one."""
    return os.path.join(data_dir_root, f"dpn_jax-shorter{shorter}-q{quality}")


def write_resized_copy(
    source_dir: str,
    target_dir: str,
    *,
    image_key: str,
    shorter: int,
    quality: int,
    workers: int | None = None,
) -> str:
    """Write `source_dir` (a prepared TFDS dataset version directory) to `target_dir` with its
    images resized; returns `target_dir`. Reuses a copy of ours with the same settings; any
    other existing `target_dir` is refused (OutputError)."""
    check_resize_settings(shorter, quality)
    settings = {"shorter_side": shorter, "quality": quality, "source": os.path.abspath(source_dir)}
    existing = read_prepared(target_dir)
    if existing is not None and all(existing.get(k) == v for k, v in settings.items()):
        return target_dir

    def replaceable(path: Path) -> bool:  # never: a copy is reused or kept, not replaced
        other = read_prepared(path)
        if other:
            raise NotOurs(
                f"resized from {other['source']} with shorter side {other['shorter_side']}, "
                f"quality {other['quality']}; choose another --output-data-dir"
            )
        return False

    entries = [e for e in os.scandir(source_dir) if e.is_file(follow_symlinks=False)]
    entries.sort(key=lambda e: e.name)
    shards = [e.path for e in entries if SHARD_MARK in e.name]
    if not shards:
        raise DataError(f"{source_dir} holds no ArrayRecord shards to resize")
    with atomic_output(
        target_dir,
        overwrite=True,
        replaceable=replaceable,
        what="a resized dataset",
        directory=True,
    ) as staging:
        for entry in entries:  # the metadata; not the shards, nor another format's (TFRecord)
            if not SHARD_NAME.search(entry.name):
                (staging / entry.name).write_bytes(Path(entry.path).read_bytes())
        counts, shard_bytes = _resize_shards(shards, staging, image_key, shorter, quality, workers)
        describe_copy(staging, shard_bytes)
        meta = {"kind": PREPARED_KIND, **settings, "filter": RESIZE_FILTER, **counts}
        (staging / PREPARED_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return target_dir


def _resize_shards(
    shards: list[str],
    staging: Path,
    image_key: str,
    shorter: int,
    quality: int,
    workers: int | None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Rewrite each shard into `staging`, in worker processes (spawned: TensorFlow is loaded
    here and is not fork-safe); the counts of resized and kept images, and each shard's bytes
    by file name."""
    workers = workers or len(os.sched_getaffinity(0))
    jobs = [(path, str(staging / os.path.basename(path))) for path in shards]
    counts = {"images_resized": 0, "images_kept": 0}
    shard_bytes = {}
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context)
    with pool:
        futures = [
            pool.submit(_resize_shard, source, target, image_key, shorter, quality)
            for source, target in jobs
        ]
        for (_, target), future in zip(jobs, futures):
            shard_counts, shard_bytes[os.path.basename(target)] = future.result()
            for key, value in shard_counts.items():
                counts[key] += value
    return counts, shard_bytes


def _resize_shard(
    source: str, target: str, image_key: str, shorter: int, quality: int
) -> tuple[dict[str, int], int]:
    """One ArrayRecord shard, record by record, with the writer options TFDS used; the counts
    of resized and kept images, and the records' bytes (what TFDS counts as a split's size)."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
    from tensorflow.core.example import example_pb2

    reader = ArrayRecordReader(source)
    writer = ArrayRecordWriter(target, reader.writer_options_string())
    counts = {"images_resized": 0, "images_kept": 0}
    num_bytes = 0
    try:
        for index, record in enumerate(reader.read_all()):
            example = example_pb2.Example.FromString(record)
            values = example.features.feature[image_key].bytes_list.value
            name = f"{os.path.basename(source)}[{index}]"
            original = values[0]
            image = resized_jpeg(original, name, shorter, quality)
            if image is original:
                counts["images_kept"] += 1
            else:
                counts["images_resized"] += 1
                values[0] = image
            record = example.SerializeToString()
            num_bytes += len(record)
            writer.write(record)
    finally:
        writer.close()
        reader.close()
    return counts, num_bytes


def describe_copy(directory: Path, shard_bytes: dict[str, int]) -> None:
    """Make the copied `dataset_info.json` in `directory` describe the copy: each split's
    num_bytes is the sum of its rewritten records (as TFDS counts it when preparing), or 0
    (TFDS's 'unknown') when one of its shards was not rewritten; the format is ArrayRecord
    only, the one format copied. Shard lengths (examples per shard) stay: records are
    rewritten one for one."""
    from tensorflow_datasets.core import dataset_info, naming

    proto = dataset_info.read_from_json(directory / DATASET_INFO_FILE)
    for split in proto.splits:
        template = naming.ShardedFileTemplate(
            data_dir=directory,
            template=split.filepath_template,
            dataset_name=proto.name,
            split=split.name,
            filetype_suffix=ARRAY_RECORD,
        )
        names = [
            str(path.relative_to(directory))
            for path in template.sharded_filepaths(len(split.shard_lengths))
        ]
        known = all(name in shard_bytes for name in names)
        split.num_bytes = sum(shard_bytes[name] for name in names) if known else 0
    proto.file_format = ARRAY_RECORD
    del proto.alternative_file_formats[:]
    dataset_info.write_dataset_info_proto(proto, directory)
