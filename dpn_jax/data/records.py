"""What a dataset gives the pipeline: random-access sources of `Record`s, and how a split is
sharded over processes.

A record source is grain's `RandomAccessDataSource` (`len()` and `[index]`); a `Record` is the
encoded image, its label and a name for messages (a path, a file name). Records are read only
when indexed, so a pipeline that starts at example k reads nothing before it. Decoding,
augmentation and batching are the pipeline's business. The concrete datasets (digits, folder,
tfds_source) build on this module; `dpn_jax.data.sources` opens them by spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypedDict


class Record(TypedDict):
    image: bytes  # encoded (JPEG, PNG, ...)
    label: int
    name: str  # names the image in warnings: a path, a TFDS file name


class RecordSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


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
