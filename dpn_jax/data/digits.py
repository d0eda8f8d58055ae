"""`digits`: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans), offline.

Upsampled to 64x64 RGB PNGs so they flow through the same decode/augment code as photos.
The train/validation split is fixed: a seed-0 permutation, the last 360 (20%) for validation.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

from dpn_jax.data.records import InMemoryRecords
from dpn_jax.errors import DataError

IMAGE_SIZE = 64
NUM_VALIDATION = 360


@functools.cache
def _encoded_splits() -> dict[str, InMemoryRecords]:
    import sklearn.datasets

    digits = sklearn.datasets.load_digits()
    order = np.random.RandomState(0).permutation(len(digits.images))
    splits = {"train": order[:-NUM_VALIDATION], "validation": order[-NUM_VALIDATION:]}
    return {
        name: InMemoryRecords(
            [_to_png(digits.images[i]) for i in indices],
            [int(digits.target[i]) for i in indices],
            [f"digits/{i}" for i in indices],
        )
        for name, indices in splits.items()
    }


def _to_png(pixels_0_16: np.ndarray) -> bytes:
    gray = Image.fromarray(np.rint(pixels_0_16 * (255 / 16)).astype(np.uint8))
    image = gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class DigitsDataset:
    spec = "digits"
    class_names = tuple(str(d) for d in range(10))
    default_eval_split = "validation"

    def records(self, split: str) -> InMemoryRecords:
        splits = _encoded_splits()
        if split not in splits:
            raise DataError(f"digits has splits {sorted(splits)}, not {split!r}")
        return splits[split]

    def num_examples(self, split: str) -> int:
        return len(self.records(split))
