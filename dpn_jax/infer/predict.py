"""Classify images with a converted or fine-tuned DPN: the `Predictor` behind `dpn-predict`.

Preprocessing is the model's `Preprocessing` run through timm's eval transform, so a converted
timm checkpoint gives the classes and probabilities timm gives. As in timm's `inference.py` /
`validate.py`, a model's test-time size (dpn68b.ra_in1k: 288, crop 1.0) is used unless
`--use-train-size` is given; `--img-size` / `--crop-pct` override both.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from dpn_jax.data.folder import IMAGE_EXTENSIONS
from dpn_jax.data.labels import class_names as resolve_class_names
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.data.transforms import eval_crop, load_image, normalize
from dpn_jax.errors import ConfigError
from dpn_jax.models.dpn import DPN
from dpn_jax.runtime.runner import REPLICATED, SHARDED, Runner
from dpn_jax.weights.model_dir import ModelDir
from dpn_jax.weights.pretrained import load_model

ImageInput = str | os.PathLike | Image.Image


@dataclass(frozen=True)
class FileResult:
    file: str
    top_k: list[dict[str, Any]] | None = None
    error: str | None = None  # one line naming the file, when it could not be classified


def make_predict_step(model: DPN, mean: Sequence[float], std: Sequence[float]):
    """One device's class probabilities for its rows of a batch of uint8 images."""

    def predict_step(variables: dict[str, Any], images: jax.Array) -> jax.Array:
        logits = model.apply(variables, normalize(images, mean, std, model.dtype), train=False)
        return jax.nn.softmax(logits, axis=-1)

    return predict_step


class Predictor:
    """Runs a DPN on images: timm's eval preprocessing, batching, one compile per batch shape.

    Images cross to the devices as uint8 and are normalised there. A batch is spread over this
    process's devices (`Runner`) and padded up to a power of two (at most `batch_size`, rounded
    up to a multiple of the device count), so a stream of inputs of any length compiles only a
    handful of shapes.
    """

    def __init__(
        self,
        model: DPN,
        variables: dict[str, Any],
        preprocessing: Preprocessing,
        class_names: Sequence[str] | None = None,
        batch_size: int = 32,
        parallelism: str = "shard_map",
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.runner = Runner(parallelism, jax.local_devices())
        self.variables = self.runner.replicate(variables)
        self.preprocessing = preprocessing  # resolved (`Preprocessing.resolve`)
        self.class_names = resolve_class_names(model.num_classes, class_names)
        self.batch_size = batch_size
        self._probabilities = self.runner.compile(
            make_predict_step(model, preprocessing.mean, preprocessing.std),
            in_specs=(REPLICATED, SHARDED),
            out_specs=SHARDED,
        )

    @classmethod
    def from_model(
        cls,
        model: ModelDir,
        *,
        img_size: int | None = None,
        crop_pct: float | None = None,
        use_test_size: bool = True,
        batch_size: int = 32,
    ) -> Predictor:
        """Predictor for a loaded model, its preprocessing resolved as timm's scripts do (the
        test-time size unless `use_test_size` is False; `img_size` / `crop_pct` override)."""
        preprocessing = model.preprocessing.resolve(img_size, crop_pct, use_test_size)
        return cls(model.build_model(), model.variables, preprocessing, model.labels, batch_size)

    @classmethod
    def load(cls, source: str | os.PathLike, **kwargs: Any) -> Predictor:
        """Predictor for what `dpn_jax.load_model` reads (a model directory, a pretrained tag
        such as `dpn92.mx_in1k`, a hub id); kwargs as `from_model`."""
        return cls.from_model(load_model(source), **kwargs)

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """A path or PIL image -> HWC uint8 pixels, resized and cropped as timm's eval transform.

        Files go through `load_image` (EXIF, 16-bit, bounded memory); a PIL image is taken as
        it is and converted to RGB first, as timm does.
        """
        image = load_image(image) if not isinstance(image, Image.Image) else image.convert("RGB")
        c = self.preprocessing
        return eval_crop(
            image, image_size=c.image_size, crop_pct=c.crop_pct, interpolation=c.interpolation
        )

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Softmax over classes for preprocessed uint8 images [N, H, W, 3] -> [N, num_classes]."""
        if len(pixels) == 0:
            return np.zeros((0, self.model.num_classes), np.float32)
        return np.concatenate(
            [
                self._padded_batch(pixels[start : start + self.batch_size])
                for start in range(0, len(pixels), self.batch_size)
            ]
        )

    def _padded_batch(self, batch: np.ndarray) -> np.ndarray:
        devices = self.runner.num_devices
        size = -(-min(self.batch_size, 1 << (len(batch) - 1).bit_length()) // devices) * devices
        padded = np.pad(batch, [(0, size - len(batch))] + [(0, 0)] * (batch.ndim - 1))
        probabilities = self._probabilities(self.variables, self.runner.put_batch(padded))
        return self.runner.local(probabilities)[: len(batch)]

    def top_k(self, probabilities: np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
        """[{"index", "label", "prob"}, ...] per image, most probable first."""
        k = min(k, probabilities.shape[-1])
        order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
        return [
            [
                {
                    "index": int(i),
                    "label": self.class_names[i] if self.class_names else None,
                    "prob": float(p[i]),
                }
                for i in row
            ]
            for p, row in zip(probabilities, order)
        ]

    def predict(self, images: Sequence[ImageInput], top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-k classes of each image (paths or PIL images)."""
        if not images:
            return []
        pixels = np.stack([self.preprocess(image) for image in images])
        return self.top_k(self.probabilities(pixels), top_k)

    def predict_files(self, paths: Iterable[Path], top_k: int = 5) -> Iterator[FileResult]:
        """Top-k of each file, `batch_size` files in memory at a time; a file that cannot be read
        gives a result with `error` set instead of stopping the others."""
        batch: list[tuple[Path, np.ndarray]] = []
        for path in paths:
            try:
                batch.append((path, self.preprocess(path)))
            except (OSError, ValueError) as error:
                yield FileResult(str(path), error=_error_line(path, error))
            if len(batch) == self.batch_size:
                yield from self._predict_batch(batch, top_k)
                batch = []
        yield from self._predict_batch(batch, top_k)

    def _predict_batch(
        self, batch: list[tuple[Path, np.ndarray]], top_k: int
    ) -> Iterator[FileResult]:
        if batch:
            top = self.top_k(self.probabilities(np.stack([pixels for _, pixels in batch])), top_k)
            for (path, _), classes in zip(batch, top):
                yield FileResult(str(path), top_k=classes)


def expand_inputs(paths: Iterable[str]) -> Iterator[Path]:
    """Files as given, folders walked recursively (image extensions only, sorted)."""
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
        else:
            yield path


def _error_line(path: Path, error: Exception) -> str:
    if not path.exists():
        return f"{path}: no such file or directory"
    message = str(error)
    return message if str(path) in message else f"{path}: {message}"
