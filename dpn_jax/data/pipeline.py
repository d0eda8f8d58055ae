"""Train and eval batches of uint8 images for a dataset spec, per process (tf.data; being replaced by grain).

Dataset specs (see `dpn_jax.data.sources`): `digits` (offline, bundled with scikit-learn),
`imagenet2012`, `tfds:NAME` (e.g. `tfds:imagenette/320px`) and `folder:PATH`.

Training: each process reads its own shard, reshuffled every epoch from (seed, epoch), with
random-resized crop (fused decode-and-crop for JPEG) and a horizontal flip drawn from
(seed, process, example number) - so batch k is the same whether or not the run restarted at k.
Evaluation: timm's eval transform (Pillow, `dpn_jax.data.transforms`), one pass over this process's
shard, the last batches padded and masked so every example counts exactly once and every
process runs the same number of batches.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dpn_jax.data.sources import DatasetInfo, Reader, Shard, open_reader
from dpn_jax.data.transforms import decode_and_eval_crop, size_pair

__all__ = ["DatasetInfo", "dataset_info", "train_batches", "eval_batches", "train_dataset",
           "eval_dataset"]

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
_JPEG_MAGIC = b"\xff\xd8\xff"


def dataset_info(spec: str, *, data_dir: str | None = None, eval_split: str | None = None,
                 train_split: str = "train", manual_dir: str | None = None) -> DatasetInfo:
    """Classes and split sizes of a dataset spec (prepares a TFDS dataset if needed)."""
    reader = _reader(spec, data_dir, manual_dir)
    try:
        num_train = reader.num_examples(train_split)
    except (KeyError, ValueError):  # an evaluation-only dataset, e.g. a folder with just val/
        num_train = 0
    return DatasetInfo(num_classes=len(reader.class_names), class_names=reader.class_names,
                       num_train_examples=num_train,
                       num_eval_examples=reader.num_examples(eval_split or reader.default_eval_split))


def train_batches(spec: str, *, batch_size: int, image_size: int | Sequence[int],
                  interpolation: str = "bicubic", seed: int = 0, data_dir: str | None = None,
                  train_split: str = "train", manual_dir: str | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  shuffle_buffer_size: int = 16_384) -> "TrainBatches":
    """Endless batches {"image": uint8 [batch_size, H, W, 3], "label": int32 [batch_size]} of
    this process's shard; `get_state()` / `set_state()` give and restore the position."""
    process_index, process_count = _process(process_index, process_count)
    shard = _reader(spec, data_dir, manual_dir).shard(train_split, process_index, process_count)

    def from_step(step: int) -> Iterator[Batch]:
        return iter(tfds.as_numpy(train_dataset(
            shard, batch_size=batch_size, image_size=image_size, seed=seed,
            process_index=process_index, start_step=step, shuffle_buffer_size=shuffle_buffer_size)))

    return TrainBatches(from_step)


class TrainBatches:
    """An endless batch iterator whose state is the number of batches it has given."""

    def __init__(self, from_step):
        self._from_step = from_step
        self._step = 0
        self._batches = from_step(0)

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> Batch:
        batch = next(self._batches)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"batches": self._step}

    def set_state(self, state: dict[str, int]) -> None:
        self._step = int(state["batches"])
        self._batches = self._from_step(self._step)


def eval_batches(spec: str, *, batch_size: int, image_size: int | Sequence[int], crop_pct: float,
                 interpolation: str, data_dir: str | None = None, eval_split: str | None = None,
                 manual_dir: str | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Batch]:
    """One pass over this process's shard: {"image": uint8, "label", "mask"}, mask False on padding.

    Every process yields ceil(largest shard / batch) batches, so collectives stay in step.
    Undecodable images are skipped, counted and reported in a warning at the end.
    """
    process_index, process_count = _process(process_index, process_count)
    reader = _reader(spec, data_dir, manual_dir)
    split = eval_split or reader.default_eval_split
    shard = reader.shard(split, process_index, process_count)
    dataset = eval_dataset(shard, batch_size=batch_size, image_size=image_size,
                           crop_pct=crop_pct, interpolation=interpolation)
    num_batches = math.ceil(shard.largest_shard_size / batch_size)
    padding = {"image": np.zeros((batch_size, *size_pair(image_size), 3), np.uint8),
               "label": np.zeros(batch_size, np.int32),
               "mask": np.zeros(batch_size, bool)}
    return _padded_eval_batches(
        iter(tfds.as_numpy(dataset)), num_batches=num_batches, padding=padding,
        expected=shard.num_examples, what=f"{spec} {split}")


def train_dataset(shard: Shard, *, batch_size: int, image_size: int | Sequence[int],
                  seed: int = 0, process_index: int = 0, start_step: int = 0,
                  shuffle_buffer_size: int = 16_384) -> tf.data.Dataset:
    """Endless per-process batches of randomly cropped, flipped uint8 images.

    Exact resume: example number i of the stream depends only on (seed, process, i), and
    `start_step` starts at example start_step * batch_size by reading (not decoding) at most
    one epoch of TFDS records (folder images are not even read). Corrupt images are skipped with a TF warning, which shifts later
    batches (deterministically) relative to a resume.
    """
    num_examples = shard.num_examples
    if num_examples == 0:
        raise ValueError("this process's training shard is empty")
    start_epoch, offset = divmod(start_step * batch_size, num_examples)
    buffer_size = num_examples if shard.in_memory else min(num_examples, shuffle_buffer_size)
    base_seed = tf.constant([seed, process_index], tf.int64)

    def epoch(index: tf.Tensor) -> tf.data.Dataset:
        order_seed = tf.random.experimental.stateless_fold_in(base_seed, index)[0]
        shuffled = shard.examples.shuffle(buffer_size, seed=order_seed,
                                          reshuffle_each_iteration=False)
        numbered = shuffled.enumerate(start=index * num_examples)
        return numbered.map(lambda number, example: {**example, "number": number})

    height, width = size_pair(image_size)

    def augment(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        example_seed = tf.random.experimental.stateless_fold_in(base_seed, example["number"])
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(example_seed, 2))
        image = _decode_random_crop(example["image"], crop_seed)
        image = tf.image.resize(image, (height, width), method="bicubic", antialias=True)
        image = tf.image.stateless_random_flip_left_right(tf.clip_by_value(image, 0.0, 255.0),
                                                          flip_seed)
        return {"image": tf.cast(tf.round(image), tf.uint8), "label": example["label"]}

    stream = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    dataset = (shard.load(stream.skip(offset))
               .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
               .ignore_errors(log_warning=True)
               .batch(batch_size, drop_remainder=True)
               .prefetch(tf.data.AUTOTUNE))
    return dataset.with_options(_data_options())


def eval_dataset(shard: Shard, *, batch_size: int, image_size: int | Sequence[int],
                 crop_pct: float, interpolation: str) -> tf.data.Dataset:
    """This shard, transformed exactly like timm at evaluation, in batches (last one short)."""
    transform = functools.partial(decode_and_eval_crop, image_size=image_size,
                                  crop_pct=crop_pct, interpolation=interpolation)
    height, width = size_pair(image_size)

    def transform_or_flag(encoded: bytes, name: bytes) -> tuple[np.ndarray, bool]:
        try:
            return transform(encoded, name.decode()), True
        except ValueError as error:  # names the file and what is wrong with it
            log.warning("skipping undecodable image %s", error)
            return np.zeros((height, width, 3), np.uint8), False

    def preprocess(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image, decoded = tf.numpy_function(transform_or_flag, [example["image"], example["id"]],
                                           (tf.uint8, tf.bool), stateful=False)
        image = tf.ensure_shape(image, (height, width, 3))
        return {"image": image, "label": example["label"],
                "decoded": decoded}

    dataset = (shard.load(shard.examples).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
               .filter(lambda example: example["decoded"])
               .map(lambda example: {"image": example["image"], "label": example["label"]})
               .batch(batch_size)
               .prefetch(tf.data.AUTOTUNE))
    return dataset.with_options(_data_options())


def _decode_random_crop(encoded: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Decode a random-resized-crop window: only the window for JPEG, the whole image (then
    sliced) for other formats."""
    def jpeg() -> tf.Tensor:
        return tf.io.decode_and_crop_jpeg(
            encoded, _random_crop_window(tf.io.extract_jpeg_shape(encoded), seed), channels=3)

    def other() -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        top, left, height, width = tf.unstack(_random_crop_window(tf.shape(image), seed))
        return image[top:top + height, left:left + width]

    return tf.cond(tf.strings.substr(encoded, 0, 3) == _JPEG_MAGIC, jpeg, other)


def _random_crop_window(shape: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> tf.Tensor:
    """timm's `RandomResizedCropAndInterpolation.get_params` as TF ops: [top, left, h, w].

    Up to `attempts` draws of (area uniform in `scale`, log-uniform aspect `ratio`); the first fit
    is placed uniformly, else the center crop clamped to `ratio`.
    """
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    area_seed, ratio_seed, place_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    area = tf.random.stateless_uniform([attempts], area_seed, *scale) * height * width
    aspect = tf.exp(tf.random.stateless_uniform([attempts], ratio_seed, math.log(ratio[0]),
                                                math.log(ratio[1])))
    crop_w, crop_h = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
    fits = (crop_w <= width) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))
    found = tf.reduce_any(fits)
    in_ratio = width / height
    crop_w = tf.where(found, crop_w[first],
                      tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width))
    crop_h = tf.where(found, crop_h[first],
                      tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height))
    crop_w, crop_h = tf.maximum(crop_w, 1.0), tf.maximum(crop_h, 1.0)
    place = tf.random.stateless_uniform([2], place_seed)
    top = tf.where(found, tf.floor(place[0] * (height - crop_h + 1)), tf.floor((height - crop_h) / 2))
    left = tf.where(found, tf.floor(place[1] * (width - crop_w + 1)), tf.floor((width - crop_w) / 2))
    return tf.cast(tf.stack([top, left, crop_h, crop_w]), tf.int32)


def _padded_eval_batches(batches: Iterator[Batch], *, num_batches: int, padding: Batch,
                         expected: int, what: str) -> Iterator[Batch]:
    """`num_batches` batches the size of `padding` (an all-masked batch), real examples first."""
    seen = 0
    for _ in range(num_batches):
        batch = next(batches, None)
        count = 0 if batch is None else len(batch["label"])
        if count == len(padding["mask"]):
            batch["mask"] = np.ones(count, bool)
        else:
            batch = _pad(batch, padding, count)
        seen += count
        yield batch
    if seen < expected:
        log.warning("%s: skipped %d of %d images that could not be decoded (named above)",
                    what, expected - seen, expected)


def _pad(batch: Batch | None, padding: Batch, count: int) -> Batch:
    padded = {key: value.copy() for key, value in padding.items()}
    if count:
        padded["image"][:count], padded["label"][:count] = batch["image"], batch["label"]
        padded["mask"][:count] = True
    return padded


def _reader(spec: str, data_dir: str | None, manual_dir: str | None) -> Reader:
    _configure_tensorflow()
    return open_reader(spec, data_dir=data_dir, manual_dir=manual_dir)


@functools.cache
def _configure_tensorflow() -> None:
    """TensorFlow is only the input pipeline: it must never allocate accelerator memory."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow's runtime was started before the input pipeline
        if tf.config.list_logical_devices("GPU"):
            log.warning("TensorFlow was initialised before dpn_jax.data.pipeline and sees a GPU; "
                        "it may take GPU memory that JAX needs")


def _data_options() -> tf.data.Options:
    """Deterministic order; one private pool sized to the CPUs this process may use."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    options.threading.max_intra_op_parallelism = 1
    return options


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)
