"""`folder:PATH`: a user's images laid out PATH/<split>/<class>/<image>.

Classes are the sorted union of class folder names over all splits, so labels agree between
splits. Files are listed in sorted order; a file is read only when its record is indexed, and
corrupt files are found (and skipped) when decoded. A FIFO or a device among the images is
refused when listed: reading it would block the pipeline forever.
"""

from __future__ import annotations

import os

from dpn_jax.data.records import Record
from dpn_jax.errors import DataError
from dpn_jax.system.files import special_file

# What a folder dataset lists and `dpn-predict` reads from a directory: formats Pillow decodes.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
)
EVAL_SPLIT_NAMES = ("validation", "val", "test")


class FileRecords:
    """Records of image files, read on access. A file that cannot be read gives empty bytes,
    which the pipeline's decode reports like a corrupt image."""

    def __init__(self, paths: list[str], labels: list[int]):
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Record:
        path = self.paths[index]
        try:
            with open(path, "rb") as file:
                image = file.read()
        except OSError:
            image = b""  # decoding says "not an image"; the path is in the record's name
        return Record(image=image, label=self.labels[index], name=path)


class FolderDataset:
    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise DataError(f"folder dataset {root!r}: no such directory")
        self.spec = f"folder:{root}"
        self.root = root
        splits = {
            name: self._class_dirs(name)
            for name in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, name))
        }
        self.splits = {name: classes for name, classes in splits.items() if classes}
        if not self.splits:
            raise DataError(f"folder dataset {root!r}: expected {root}/<split>/<class>/<image>")
        self.class_names = tuple(sorted(set().union(*self.splits.values())))
        self._records: dict[str, FileRecords] = {}

    @property
    def default_eval_split(self) -> str:
        for name in EVAL_SPLIT_NAMES:
            if name in self.splits:
                return name
        raise DataError(
            f"folder dataset {self.root!r} has no {'/'.join(EVAL_SPLIT_NAMES)} "
            f"split (has {sorted(self.splits)}); pass eval_split"
        )

    def _class_dirs(self, split: str) -> list[str]:
        split_dir = os.path.join(self.root, split)
        return [c for c in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, c))]

    def records(self, split: str) -> FileRecords:
        if split not in self.splits:
            raise DataError(
                f"folder dataset {self.root!r} has splits {sorted(self.splits)}, not {split!r}"
            )
        if split not in self._records:
            paths, labels = [], []
            for label, name in enumerate(self.class_names):
                class_dir = os.path.join(self.root, split, name)
                if not os.path.isdir(class_dir):
                    continue
                for path in self._image_files(class_dir):
                    paths.append(path)
                    labels.append(label)
            if not paths:
                raise DataError(
                    f"folder dataset {self.root!r}: no "
                    f"{'/'.join(IMAGE_EXTENSIONS)} images under split {split!r}"
                )
            self._records[split] = FileRecords(paths, labels)
        return self._records[split]

    def _image_files(self, class_dir: str) -> list[str]:
        """The paths of the image files in `class_dir`, sorted; DataError for a special file
        (only entries that are not plain files are checked: a directory entry says which)."""
        with os.scandir(class_dir) as scan:
            entries = sorted(
                (e for e in scan if e.name.lower().endswith(IMAGE_EXTENSIONS)),
                key=lambda e: e.name,
            )
        for entry in entries:
            if not entry.is_file(follow_symlinks=False) and (kind := special_file(entry.path)):
                raise DataError(
                    f"folder dataset {self.root!r}: {entry.path} is {kind}, not a regular "
                    "file; move it out of the dataset"
                )
        return [entry.path for entry in entries]

    def num_examples(self, split: str) -> int:
        return len(self.records(split))
