"""Training and evaluation batches for a dataset spec: grain over random-access records.

Dataset specs (see `dpn_jax.data.sources`): `digits` (offline, bundled with scikit-learn),
`imagenet2012`, `tfds:NAME` (e.g. `tfds:imagenette/320px`, prepared once as ArrayRecord by
`dpn-prepare-data`) and `folder:PATH`. No TensorFlow is imported.

Batches are this process's, uint8 images [batch, H, W, 3] plus int32 labels; normalisation
happens on the device (`dpn_jax.data.transforms.normalize`). Whole batches are decoded in
threads of this process (one per CPU it may use) or, with `num_workers` > 0, in that many grain
worker processes (spawned: a script using them needs an `if __name__ == "__main__":` guard).

Training (`train_batches`): each process reads its own contiguous shard of the split as an
endless stream of examples, reshuffled every epoch from (seed, process); example i of the stream
is augmented (timm's train transform: crop, flip, then RandAugment/AutoAugment or colour jitter,
`transforms.TrainTransform`) with a generator seeded by (seed, process, i), and batch k holds
examples [k * batch, (k + 1) * batch). So batch k depends only on (seed, process,
process_count, k), not on threads, workers or restarts, and the iterator's JSON state (the
next k) restores the position without reading anything before it.
An undecodable image is replaced by the next example of the stream (as timm's datasets do),
named once in a warning; a stream where no image decodes ends with a DataError.

Evaluation (`eval_batches`): timm's eval transform (`transforms.eval_crop`) over one pass of this
process's shard, padded to ceil(largest shard / batch) batches so every process runs the same
number; padding and undecodable images carry mask False.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import absl.flags
import grain
import numpy as np

from dpn_jax.data.records import RecordSource, even_shard_bounds
from dpn_jax.data.sources import Dataset, open_dataset
from dpn_jax.data.transforms import (
    TrainTransform,
    UndecodableImage,
    check_eval_settings,
    decode_image,
    eval_crop,
    reduced_eval_crop,
    size_pair,
)
from dpn_jax.errors import ConfigError, DataError

__all__ = ["DatasetInfo", "TrainBatches", "dataset_info", "eval_batches", "train_batches"]

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

# timm's datasets give up after 50 consecutive unreadable samples; so does the training stream.
MAX_CONSECUTIVE_FAILURES = 50
# Threads decoding whole batches in each worker process (they overlap file reads with decoding;
# the processes use the cores). Without workers, one thread per CPU of this process.
THREADS_PER_WORKER = 2


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    class_names: tuple[str, ...]
    num_train_examples: int  # 0 for an evaluation-only dataset (e.g. a folder with just val/)
    num_eval_examples: int
    prepared: str = ""  # how the images were prepared, if not the originals (data.resized)


def dataset_info(
    spec: str,
    *,
    data_dir: str | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    manual_dir: str | None = None,
) -> DatasetInfo:
    """Classes and split sizes of a dataset spec; DataError (one line) if it cannot be read."""
    dataset = open_dataset(spec, data_dir=data_dir, manual_dir=manual_dir)
    try:
        num_train = dataset.num_examples(train_split)
    except DataError:  # no such split: an evaluation-only dataset
        num_train = 0
    num_eval = dataset.num_examples(eval_split or dataset.default_eval_split)
    return DatasetInfo(
        num_classes=len(dataset.class_names),
        class_names=dataset.class_names,
        num_train_examples=num_train,
        num_eval_examples=num_eval,
        prepared=getattr(dataset, "prepared", ""),
    )


def train_batches(
    spec: str,
    *,
    batch_size: int,
    image_size: int | Sequence[int],
    interpolation: str,
    seed: int,
    data_dir: str | None = None,
    train_split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    manual_dir: str | None = None,
    start_batch: int = 0,
    aa: str | None = None,
    color_jitter: float | Sequence[float] = 0.0,
    color_jitter_prob: float | None = None,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    no_aug: bool = False,
    reduced_decode: bool = False,
) -> TrainBatches:
    """Endless {"image": uint8 [batch_size, H, W, 3], "label": int32 [batch_size]} batches of
    this process's shard (see the module docstring); `get_state()` / `set_state()` resume.

    `start_batch` k starts at batch k, as `set_state` to k would (for a checkpoint that saved
    its step but no input state). `interpolation` may be 'random'; `aa`, `color_jitter`,
    `color_jitter_prob` and `no_aug` are timm's (see `transforms.TrainTransform`; `mean` is
    the fill of the `aa` ops). `reduced_decode` decodes JPEGs at a reduced DCT scale where the
    crop window keeps at least the output's pixels (`transforms.reduced_train_crop`):
    the same crops, close but not identical pixels.
    """
    _check_batch_size(batch_size)
    transform = TrainTransform(  # bad settings fail here, not in a worker
        image_size=image_size,
        interpolation=interpolation,
        aa=aa,
        color_jitter=color_jitter,
        color_jitter_prob=color_jitter_prob,
        mean=tuple(mean),
        no_aug=no_aug,
        reduced_decode=reduced_decode,
    )
    process_index, process_count = _topology(process_index, process_count)
    dataset = open_dataset(spec, data_dir=data_dir, manual_dir=manual_dir)
    shard, split_size = _shard(dataset, train_split, process_index, process_count)
    if len(shard) == 0:
        raise DataError(
            f"{spec} {train_split}: {split_size} examples leave none for process "
            f"{process_index} of {process_count}"
        )
    seed_words = (seed, process_index)
    stream = shard.shuffle(seed=_grain_seed(seed_words)).repeat()
    examples = grain.MapDataset.range(len(stream)).map(
        _TrainExample(stream, seed_words, transform=transform, what=f"{spec} {train_split}")
    )
    fingerprint = {
        "seed": int(seed),
        "process_count": int(process_count),
        "batch_size": int(batch_size),
        "split_size": int(split_size),
    }
    batches = TrainBatches(
        examples.batch(batch_size, drop_remainder=True, batch_fn=_collate),
        fingerprint=fingerprint,
        num_workers=num_workers,
    )
    batches.set_state({**fingerprint, "next_batch": start_batch})
    return batches


def eval_batches(
    spec: str,
    *,
    batch_size: int,
    image_size: int | Sequence[int],
    crop_pct: float,
    interpolation: str,
    data_dir: str | None = None,
    eval_split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    manual_dir: str | None = None,
    reduced_decode: bool = False,
) -> Iterator[Batch]:
    """One pass over this process's shard: {"image": uint8, "label": int32, "mask": bool}.

    Every process yields ceil(largest shard / batch_size) batches, so collectives stay in step;
    mask is False on padding and on undecodable images (each named in a warning, and counted in
    one at the end). `reduced_decode` decodes JPEGs at a reduced DCT scale that keeps at least
    the resize size (`transforms.reduced_eval_crop`): close but not identical pixels.
    """
    _check_batch_size(batch_size)
    check_eval_settings(crop_pct, interpolation)  # fails here, not in a worker
    process_index, process_count = _topology(process_index, process_count)
    dataset = open_dataset(spec, data_dir=data_dir, manual_dir=manual_dir)
    split = eval_split or dataset.default_eval_split
    shard, split_size = _shard(dataset, split, process_index, process_count)
    num_batches = math.ceil(math.ceil(split_size / process_count) / batch_size)
    transform = _EvalExample(
        shard,
        image_size=size_pair(image_size),
        crop_pct=crop_pct,
        interpolation=interpolation,
        reduced_decode=reduced_decode,
    )
    batches = (
        grain.MapDataset.range(num_batches * batch_size)
        .map(transform)
        .batch(batch_size, batch_fn=_collate)
    )
    return _reported_eval_batches(_iterate(batches, num_workers), len(shard), f"{spec} {split}")


class TrainBatches(grain.DatasetIterator):
    """The training batch iterator; its state is {"next_batch": k, ...what the stream is}.

    `set_state` moves to batch k in O(1): the batches are a random-access grain `MapDataset`,
    and iteration restarts from its slice [k:]. A state from a stream with another seed, batch
    size, process count or split size is refused (DataError): it would not resume exactly.
    The state is the same on every process, so one process's saved state restores them all.
    """

    def __init__(
        self, batches: grain.MapDataset, *, fingerprint: dict[str, int], num_workers: int = 0
    ):
        super().__init__()
        self._batches, self._fingerprint, self._num_workers = batches, fingerprint, num_workers
        self._next_batch = 0
        self._iterator: grain.DatasetIterator | None = None
        self._report = _SkipReport()

    def __next__(self) -> Batch:
        self._assert_not_closed()
        if self._iterator is None:
            self._iterator = _iterate(self._batches[self._next_batch :], self._num_workers)
        batch = next(self._iterator)
        self._next_batch += 1
        self._report(batch.pop("skipped"))
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_batch": self._next_batch, **self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = {key: state.get(key) for key in self._fingerprint}
        if saved != self._fingerprint:
            differ = ", ".join(
                f"{key} {saved[key]} (now {value})"
                for key, value in self._fingerprint.items()
                if saved[key] != value
            )
            raise DataError(
                f"the saved input state is from another training stream ({differ}); "
                "it cannot resume exactly"
            )
        next_batch = state.get("next_batch")
        if not isinstance(next_batch, (int, np.integer)) or next_batch < 0:
            raise DataError(f"input state: next_batch must be an integer >= 0, got {next_batch!r}")
        self._close_iterator()
        self._next_batch = int(next_batch)

    def close(self) -> None:
        self._close_iterator()
        super().close()

    def _close_iterator(self) -> None:
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __str__(self) -> str:
        return f"TrainBatches(next_batch={self._next_batch}, {self._fingerprint})"


# ------------------------------------------------------------------ per example (in workers)


class _TrainExample:
    """Stream index -> augmented example; an undecodable image is replaced by the next one."""

    def __init__(
        self,
        stream: grain.MapDataset,
        seed_words: tuple[int, int],
        *,
        transform: TrainTransform,
        what: str,
    ):
        self.stream, self.seed_words, self.what = stream, seed_words, what
        self.transform = transform

    def __call__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((*self.seed_words, index))
        skipped = []
        for offset in range(MAX_CONSECUTIVE_FAILURES):
            record = self.stream[index + offset]
            try:
                pixels = self.transform.from_encoded(record["image"], record["name"], rng)
            except UndecodableImage as error:
                skipped.append((error.name, error.why))
                continue
            return {"image": pixels, "label": np.int32(record["label"]), "skipped": skipped}
        name, why = skipped[-1]
        raise DataError(
            f"{self.what}: no training image decodes ({len(skipped)} tried in a row, "
            f"{len(set(skipped))} files; the last, {name}: {why})"
        )


class _EvalExample:
    """Shard index -> eval-transformed example; past the shard (padding) or undecodable: masked."""

    def __init__(
        self,
        shard: grain.MapDataset,
        *,
        image_size: tuple[int, int],
        crop_pct: float,
        interpolation: str,
        reduced_decode: bool = False,
    ):
        self.shard, self.reduced_decode = shard, reduced_decode
        self.settings = {
            "image_size": image_size,
            "crop_pct": crop_pct,
            "interpolation": interpolation,
        }

    def __call__(self, index: int) -> dict[str, Any]:
        skipped = []
        if index < len(self.shard):
            record = self.shard[index]
            try:
                if self.reduced_decode:
                    pixels = reduced_eval_crop(record["image"], record["name"], **self.settings)
                else:
                    image = decode_image(record["image"], record["name"])
                    pixels = eval_crop(image, **self.settings)
                return {
                    "image": pixels,
                    "label": np.int32(record["label"]),
                    "mask": np.bool_(True),
                    "skipped": skipped,
                }
            except UndecodableImage as error:
                skipped.append((error.name, error.why))
        return {
            "image": np.zeros((*self.settings["image_size"], 3), np.uint8),
            "label": np.int32(0),
            "mask": np.bool_(False),
            "skipped": skipped,
        }


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack arrays along a new batch axis; concatenate the examples' lists of skipped images."""
    batch = {
        key: np.stack([example[key] for example in examples])
        for key in examples[0]
        if key != "skipped"
    }
    batch["skipped"] = [entry for example in examples for entry in example["skipped"]]
    return batch


# ------------------------------------------------------------------------------ in this process


class _SkipReport:
    """Names each undecodable image once, with a running count."""

    def __init__(self):
        self.names: set[str] = set()

    def __call__(self, skipped: list[tuple[str, str]]) -> None:
        for name, why in skipped:
            if name not in self.names:
                self.names.add(name)
                log.warning(
                    "skipping undecodable image %s (%d so far): %s", name, len(self.names), why
                )


def _reported_eval_batches(
    batches: Iterator[dict[str, Any]], num_examples: int, what: str
) -> Iterator[Batch]:
    report = _SkipReport()
    try:
        for batch in batches:
            report(batch.pop("skipped"))
            yield batch
    finally:
        batches.close()
    if report.names:
        log.warning(
            "%s: skipped %d of %d images that could not be decoded (named above)",
            what,
            len(report.names),
            num_examples,
        )


def _iterate(batches: grain.MapDataset, num_workers: int) -> grain.DatasetIterator:
    """Iterate `batches` in threads of this process, or of `num_workers` worker processes."""
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    threads = THREADS_PER_WORKER if num_workers else len(os.sched_getaffinity(0))
    dataset = batches.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)
    )
    if num_workers:
        if not absl.flags.FLAGS.is_parsed():  # grain's worker start reads its absl flags
            absl.flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(dataset)


def _shard(
    dataset: Dataset, split: str, process_index: int, process_count: int
) -> tuple[grain.MapDataset, int]:
    """This process's contiguous slice of a split, and the split's size."""
    records: RecordSource = dataset.records(split)
    start, end = even_shard_bounds(len(records), process_index, process_count)
    return grain.MapDataset.source(records)[start:end], len(records)


def _grain_seed(seed_words: tuple[int, ...]) -> int:
    """A 32-bit seed for grain's shuffle from (seed, process)."""
    return int(np.random.SeedSequence(seed_words).generate_state(1)[0])


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")


def _topology(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count
