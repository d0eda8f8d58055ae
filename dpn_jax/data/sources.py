"""The datasets behind the specs `digits`, `folder:PATH`, `imagenet2012` and `tfds:NAME`.

A dataset knows its classes and splits and gives each split as a random-access record source
(grain's `RandomAccessDataSource`: `len()` and `[index]`) of `Record`s: the encoded image, its
label and a name for messages (a path, a file name). Records are read only when indexed, so a
pipeline that starts at example k reads nothing before it. Decoding, augmentation and batching
are the pipeline's business. Nothing here imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypedDict

from dpn_jax.errors import DataError

SPEC_FORMS = "'digits', 'imagenet2012', 'tfds:NAME' or 'folder:PATH'"


class Record(TypedDict):
    image: bytes  # encoded (JPEG, PNG, ...)
    label: int
    name: str  # names the image in warnings: a path, a TFDS file name


class RecordSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


class Dataset(Protocol):
    spec: str
    class_names: tuple[str, ...]
    default_eval_split: str  # may raise DataError when the dataset has no evaluation split

    def num_examples(self, split: str) -> int: ...

    def records(self, split: str) -> RecordSource: ...


def open_dataset(
    spec: str, *, data_dir: str | None = None, manual_dir: str | None = None
) -> Dataset:
    """The dataset for a spec string (see the module docstring); DataError if it cannot be used.

    `manual_dir` only completes the `dpn-prepare-data` command suggested for an unprepared
    TFDS dataset; reading needs nothing but the prepared files in `data_dir`.
    """
    kind, _, arg = spec.partition(":")
    if spec == "digits":
        from dpn_jax.data.digits import DigitsDataset

        return DigitsDataset()
    if spec == "imagenet2012" or (kind == "tfds" and arg):
        from dpn_jax.data.tfds_source import TfdsDataset

        return TfdsDataset(arg or spec, spec=spec, data_dir=data_dir, manual_dir=manual_dir)
    if kind == "folder" and arg:
        from dpn_jax.data.folder import FolderDataset

        return FolderDataset(arg)
    raise DataError(f"unknown dataset spec {spec!r}; expected {SPEC_FORMS}")


def even_shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of a process's shard, sized like `tfds.even_splits` (sizes differ by <= 1)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    base, extra = divmod(num_examples, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


class InMemoryRecords:
    """A split held as lists (digits' PNGs)."""

    def __init__(self, images: Sequence[bytes], labels: Sequence[int], names: Sequence[str]):
        self.images, self.labels, self.names = images, labels, names

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Record:
        return Record(image=self.images[index], label=self.labels[index], name=self.names[index])
