"""Readers behind the dataset specs: `digits`, `folder:PATH`, `imagenet2012`, `tfds:NAME`.

A reader knows a dataset's classes and split sizes and yields one process's shard of a split
as a fixed-order `tf.data.Dataset` of {"image": encoded bytes, "label": int32, "id": str}
(for folders "image" holds the path until `Shard.load`, so shuffling moves only paths);
decoding and augmentation are the input pipeline's business.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    class_names: tuple[str, ...]
    num_train_examples: int
    num_eval_examples: int


@dataclasses.dataclass(frozen=True)
class Shard:
    """One process's part of a split. Shards are disjoint and together cover the split."""
    examples: tf.data.Dataset
    num_examples: int
    largest_shard_size: int  # over all processes: every process runs this many eval examples
    in_memory: bool = False  # elements are small: shuffle the whole shard, not a window
    read_image: Callable[[tf.Tensor], tf.Tensor] | None = None  # "image" reference -> bytes

    def load(self, examples: tf.data.Dataset) -> tf.data.Dataset:
        """`examples` (this shard's, possibly shuffled or skipped) with encoded images."""
        if self.read_image is None:
            return examples
        return examples.map(lambda ex: {**ex, "image": self.read_image(ex["image"])},
                            num_parallel_calls=tf.data.AUTOTUNE)


class Reader(Protocol):
    class_names: tuple[str, ...]
    default_eval_split: str

    def num_examples(self, split: str) -> int: ...

    def shard(self, split: str, process_index: int, process_count: int) -> Shard: ...


SPEC_FORMS = "'digits', 'imagenet2012', 'tfds:NAME' or 'folder:PATH'"


def open_reader(spec: str, *, data_dir: str | None = None,
                manual_dir: str | None = None) -> Reader:
    """The reader for a dataset spec string (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if spec == "digits":
        from dpn_jax.data.digits import DigitsReader
        return DigitsReader()
    if spec == "imagenet2012" or (kind == "tfds" and arg):
        from dpn_jax.data.tfds_source import TfdsReader
        return TfdsReader(arg or spec, data_dir=data_dir, manual_dir=manual_dir)
    if kind == "folder" and arg:
        from dpn_jax.data.folder import FolderReader
        return FolderReader(arg)
    raise ValueError(f"unknown dataset spec {spec!r}; expected {SPEC_FORMS}")


def even_shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of a process's shard, sized like `tfds.even_splits` (sizes differ by <= 1)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    base, extra = divmod(num_examples, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


def in_memory_shard(images: list[bytes] | list[str], labels: list[int], ids: list[str],
                    process_index: int, process_count: int,
                    read_image: Callable[[tf.Tensor], tf.Tensor] | None = None) -> Shard:
    """Shard of a split held as lists (digits' PNGs, folder paths)."""
    start, end = even_shard_bounds(len(images), process_index, process_count)
    examples = tf.data.Dataset.from_tensor_slices({
        "image": tf.constant(images[start:end], tf.string),
        "label": tf.constant(labels[start:end], tf.int32),
        "id": tf.constant(ids[start:end], tf.string),
    })
    largest = -(-len(images) // process_count)
    return Shard(examples, end - start, largest, in_memory=True, read_image=read_image)
