"""Image decoding and timm's transforms, shared by the input pipeline, evaluation and inference.

Images leave these functions as uint8 HWC arrays. `normalize` turns a batch of them into model
input on the accelerator, inside the jitted step, with the float32 arithmetic of timm's
`ToTensor()` + `Normalize()`; so the host moves a quarter of the bytes and does no float work.

Evaluation: `eval_crop` is `timm.data.create_transform(..., is_training=False)` up to (not
including) `ToTensor`, on PIL images with the same resize arithmetic and Pillow filters, so
`normalize(eval_crop(...))` and `eval_transform` agree with timm bit for bit (tests check).
Training: `train_crop` is timm's `RandomResizedCropAndInterpolation` (scale, ratio, ten attempts,
then the centre fallback) followed by `RandomHorizontalFlip`, drawing from a NumPy generator the
caller seeds per example; for a given window it is torchvision's `resized_crop` bit for bit.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dpn_jax.errors import ConfigError, DataError
from dpn_jax.runtime.files import special_file

# timm's interpolation names -> Pillow filters (timm.data.transforms._str_to_pil_interpolation).
PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

# timm's RandomResizedCrop defaults (ImageNet training recipes).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

# Above this many pixels a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling), which
# keeps memory bounded for scans and panoramas; ordinary photos are decoded at full size, exactly.
MAX_DECODE_PIXELS = 1 << 26


class UndecodableImage(DataError):
    """An image file that is missing, unreadable or corrupt: `name` and `why` it failed."""

    def __init__(self, name: str, why: str):
        super().__init__(f"{name}: {why}")
        self.name, self.why = name, why

    def __reduce__(self):  # raised in input worker processes, re-raised in the main one
        return type(self), (self.name, self.why)


def load_image(
    path_or_file: str | os.PathLike | BinaryIO, max_pixels: int = MAX_DECODE_PIXELS
) -> Image.Image:
    """Open an image as 8-bit RGB the way timm does (`convert('RGB')`), EXIF orientation applied.

    16-bit grayscale is scaled to 8 bit (Pillow's convert would clip it); alpha is dropped.
    Raises `UndecodableImage` (a ValueError) naming the file for missing, unreadable or corrupt
    files; a file object's name is its `name` attribute.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        name = os.fspath(path_or_file)
    else:
        name = getattr(path_or_file, "name", "<image bytes>")
    try:
        if isinstance(path_or_file, (str, os.PathLike)) and (kind := special_file(name)):
            raise ValueError(f"{kind}, not a regular file (an image)")  # reading it would block
        image = Image.open(path_or_file)  # raises DecompressionBombError above 2x the limit
        pixels = image.width * image.height
        if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
            # Pillow only warns here; a check, not warnings.catch_warnings, which would change
            # the process's warning filters under the pipeline's other decoding threads.
            raise ValueError(
                f"{image.width}x{image.height} pixels exceeds the "
                f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS}"
            )
        if image.format == "JPEG" and pixels > max_pixels:
            scale = math.sqrt(pixels / max_pixels)
            image.draft("RGB", (int(image.width / scale), int(image.height / scale)))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # (not in place: a copy of every image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # (UnidentifiedImageError is an OSError)
        if isinstance(err, UnidentifiedImageError):
            why = "not an image Pillow can read"
        elif isinstance(err, OSError) and err.strerror:
            why = err.strerror.lower()  # e.g. "no such file or directory"
        else:
            why = str(err)
        raise UndecodableImage(name, why) from None


def decode_image(encoded: bytes, name: str) -> Image.Image:
    """`load_image` on an encoded image held in memory (a dataset record); `name` for errors."""
    file = io.BytesIO(encoded)
    file.name = name
    return load_image(file)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(pixels * (255.0 / peak)), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")  # convert("RGB") would copy


def size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """224 -> (224, 224); (H, W) -> (H, W)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def pil_filter(interpolation: str) -> Image.Resampling:
    """The Pillow filter for one of timm's interpolation names."""
    if interpolation not in PIL_INTERPOLATION:
        raise ConfigError(
            f"interpolation {interpolation!r} is not one of {sorted(PIL_INTERPOLATION)}"
        )
    return PIL_INTERPOLATION[interpolation]


# ---------------------------------------------------------------------------------- evaluation


def check_eval_settings(crop_pct: float, interpolation: str) -> None:
    """ConfigError unless crop_pct is in (0, 1] and interpolation is one of timm's names."""
    pil_filter(interpolation)
    if not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")


def eval_resize_size(
    height: int, width: int, image_size: int | Sequence[int], crop_pct: float
) -> tuple[int, int]:
    """(height, width) that timm resizes an image to before the center crop.

    Square targets: shorter side -> floor(size / crop_pct), longer side truncated in proportion
    (torchvision `Resize(int)`). Non-square targets: timm's `ResizeKeepRatio`, rounding both sides.
    """
    target_h, target_w = size_pair(image_size)
    scale_h, scale_w = math.floor(target_h / crop_pct), math.floor(target_w / crop_pct)
    if scale_h == scale_w:
        short, long = min(height, width), max(height, width)
        new_short, new_long = scale_h, int(scale_h * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)
    ratio = min(height / scale_h, width / scale_w)
    return round(height / ratio), round(width / ratio)


def eval_crop(
    image: Image.Image,
    *,
    image_size: int | Sequence[int],
    crop_pct: float,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """timm's eval transform up to `ToTensor`: resize, center crop -> HWC uint8 array."""
    check_eval_settings(crop_pct, interpolation)
    new_h, new_w = eval_resize_size(image.height, image.width, image_size, crop_pct)
    if (new_h, new_w) != (image.height, image.width):
        image = image.resize((new_w, new_h), pil_filter(interpolation))
    return _center_crop(np.asarray(image.convert("RGB")), size_pair(image_size))


def eval_transform(
    image: Image.Image,
    *,
    image_size: int | Sequence[int],
    crop_pct: float,
    interpolation: str = "bicubic",
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
) -> np.ndarray:
    """timm's whole eval transform (resize, center crop, /255, normalise) -> HWC float32 array."""
    pixels = eval_crop(image, image_size=image_size, crop_pct=crop_pct, interpolation=interpolation)
    scaled = pixels.astype(np.float32) / np.float32(255)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision `center_crop`: zero-pads a smaller image, Python rounding of offsets."""
    crop_h, crop_w = size
    height, width = pixels.shape[:2]
    if crop_h > height or crop_w > width:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        pixels = np.pad(
            pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        )
        height, width = pixels.shape[:2]
    top, left = round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)
    return pixels[top : top + crop_h, left : left + crop_w]


# ------------------------------------------------------------------------------------ training


def random_resized_crop_window(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """timm's `RandomResizedCropAndInterpolation.get_params`: (top, left, height, width).

    Up to `attempts` draws of an area (uniform in `scale` of the image's) and an aspect ratio
    (log-uniform in `ratio`); the first that fits is placed uniformly at random. Otherwise the
    centre crop, clamped to `ratio`. Same arithmetic and draw order as timm, with `rng` in place
    of Python's `random` (rng.uniform(a, b) for random.uniform, rng.integers(0, n + 1) for
    random.randint(0, n)). Windows are at least 1x1 (timm fails on images that small).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = rng.uniform(*scale) * area
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect_ratio))
        crop_h = round(math.sqrt(target_area / aspect_ratio))
        if crop_w <= width and crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, max(crop_h, 1), max(crop_w, 1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_w, crop_h = round(height * max(ratio)), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, max(crop_h, 1), max(crop_w, 1)


def resized_crop(
    image: Image.Image,
    window: tuple[int, int, int, int],
    image_size: int | Sequence[int],
    interpolation: str,
    flip: bool = False,
) -> np.ndarray:
    """torchvision's `resized_crop(image, *window, size)` (+ `hflip`) -> HWC uint8 array."""
    top, left, crop_h, crop_w = window
    height, width = size_pair(image_size)
    crop = image.crop((left, top, left + crop_w, top + crop_h))
    crop = crop.resize((width, height), pil_filter(interpolation))
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


def train_crop(
    image: Image.Image,
    *,
    image_size: int | Sequence[int],
    interpolation: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """timm's training crop: random-resized crop, then a horizontal flip with probability 1/2."""
    window = random_resized_crop_window(image.height, image.width, rng)
    return resized_crop(image, window, image_size, interpolation, flip=rng.random() < 0.5)


# ---------------------------------------------------------------------------- on the device


def normalize(
    images: Any, mean: Sequence[float], std: Sequence[float], dtype: Any = np.float32
) -> jax.Array:
    """uint8 images -> `(x / 255 - mean) / std` in float32, cast to `dtype` (timm's ToTensor +
    Normalize). Meant for the inside of a jitted step; works on any array of [..., 3] pixels."""
    pixels = jnp.asarray(images).astype(jnp.float32) / jnp.float32(255)
    normalized = (pixels - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return normalized.astype(dtype)
