"""`folder:PATH`: a user's images laid out PATH/<split>/<class>/<image>.

Classes are the sorted union of class folder names over all splits, so labels agree between
splits. Files are listed in sorted order; corrupt files are found (and skipped) at decode time.
"""
from __future__ import annotations

import os

import tensorflow as tf

from dpn_jax.data.sources import Shard, in_memory_shard

# Formats both Pillow (evaluation) and tf.io.decode_image (training) read.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
EVAL_SPLIT_NAMES = ("validation", "val", "test")


class FolderReader:
    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise ValueError(f"folder dataset {root!r}: no such directory")
        self.root = root
        self.splits = {name: self._class_dirs(name) for name in sorted(os.listdir(root))
                       if os.path.isdir(os.path.join(root, name))}
        self.splits = {name: classes for name, classes in self.splits.items() if classes}
        if not self.splits:
            raise ValueError(f"folder dataset {root!r}: expected {root}/<split>/<class>/<image>")
        self.class_names = tuple(sorted(set().union(*self.splits.values())))
        self._files: dict[str, tuple[list[str], list[int]]] = {}

    @property
    def default_eval_split(self) -> str:
        for name in EVAL_SPLIT_NAMES:
            if name in self.splits:
                return name
        raise ValueError(f"folder dataset {self.root!r} has no {'/'.join(EVAL_SPLIT_NAMES)} "
                         f"split (has {sorted(self.splits)}); pass eval_split")

    def _class_dirs(self, split: str) -> list[str]:
        split_dir = os.path.join(self.root, split)
        return [c for c in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, c))]

    def _list(self, split: str) -> tuple[list[str], list[int]]:
        if split not in self.splits:
            raise ValueError(f"folder dataset {self.root!r} has splits {sorted(self.splits)}, "
                             f"not {split!r}")
        if split not in self._files:
            paths, labels = [], []
            for label, name in enumerate(self.class_names):
                class_dir = os.path.join(self.root, split, name)
                if not os.path.isdir(class_dir):
                    continue
                for file in sorted(os.listdir(class_dir)):
                    if file.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.join(class_dir, file))
                        labels.append(label)
            if not paths:
                raise ValueError(f"folder dataset {self.root!r}: no {'/'.join(IMAGE_EXTENSIONS)} "
                                 f"images under split {split!r}")
            self._files[split] = paths, labels
        return self._files[split]

    def num_examples(self, split: str) -> int:
        return len(self._list(split)[0])

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        paths, labels = self._list(split)
        return in_memory_shard(paths, labels, paths, process_index, process_count,
                               read_image=tf.io.read_file)
