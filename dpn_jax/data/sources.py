"""The datasets behind the specs `digits`, `folder:PATH`, `imagenet2012` and `tfds:NAME`.

A dataset knows its classes and splits and gives each split as a random-access record source
(`dpn_jax.data.records`). `open_dataset` imports the concrete dataset modules when a spec names
them, and they import only `records`, never this module: no import cycle, lazy or not. Nothing
here imports TensorFlow.
"""

from __future__ import annotations

from typing import Protocol

from dpn_jax.data.records import RecordSource
from dpn_jax.errors import DataError

SPEC_FORMS = "'digits', 'imagenet2012', 'tfds:NAME' or 'folder:PATH'"


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
