"""Image loading and timm's evaluation transform, shared by evaluation and inference.

`eval_transform` reproduces `timm.data.create_transform(..., is_training=False)` on PIL images
(the torchvision PIL backend timm uses): same resize arithmetic, same Pillow resampling, same
float32 normalisation, so outputs agree bit for bit. TensorFlow's antialiased bicubic resize
differs from Pillow's by up to 4 levels of 255 (mean 0.15, measured by
benchmarks/input_pipeline.py), which is why evaluation decodes and resizes with Pillow.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from typing import Any, BinaryIO, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# timm's interpolation names -> Pillow filters (timm.data.transforms._str_to_pil_interpolation).
PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

# Above this many pixels a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling), which
# keeps memory bounded for scans and panoramas; ordinary photos are decoded at full size, exactly.
MAX_DECODE_PIXELS = 1 << 26


def load_image(path_or_file: str | os.PathLike | BinaryIO,
               max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB the way timm does (`convert('RGB')`), EXIF orientation applied.

    16-bit grayscale is scaled to 8 bit (Pillow's convert would clip it); alpha is dropped.
    Raises ValueError("<path>: <why>") for missing, unreadable or corrupt files.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        name = os.fspath(path_or_file)
    else:
        name = getattr(path_or_file, "name", "<image bytes>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path_or_file)
            if image.format == "JPEG" and image.width * image.height > max_pixels:
                scale = math.sqrt(image.width * image.height / max_pixels)
                image.draft("RGB", (int(image.width / scale), int(image.height / scale)))
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:  # UnidentifiedImageError is an OSError
        why = "not an image Pillow can read" if isinstance(err, UnidentifiedImageError) else err
        raise ValueError(f"{name}: {why}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(pixels * (255.0 / peak)), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def eval_resize_size(height: int, width: int, image_size: int | Sequence[int],
                     crop_pct: float) -> tuple[int, int]:
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


def eval_crop(image: Image.Image, *, image_size: int | Sequence[int], crop_pct: float,
              interpolation: str = "bicubic") -> np.ndarray:
    """timm's eval resize and center crop -> HWC uint8 pixels (what crosses to the device)."""
    if interpolation not in PIL_INTERPOLATION:
        raise ValueError(f"interpolation {interpolation!r} is not one of {sorted(PIL_INTERPOLATION)}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    new_h, new_w = eval_resize_size(image.height, image.width, image_size, crop_pct)
    if (new_h, new_w) != (image.height, image.width):
        image = image.resize((new_w, new_h), PIL_INTERPOLATION[interpolation])
    return _center_crop(np.asarray(image.convert("RGB")), size_pair(image_size))


def eval_transform(image: Image.Image, *, image_size: int | Sequence[int], crop_pct: float,
                   interpolation: str = "bicubic",
                   mean: Sequence[float] = (0.485, 0.456, 0.406),
                   std: Sequence[float] = (0.229, 0.224, 0.225)) -> np.ndarray:
    """timm's eval transform (resize, center crop, /255, normalise) -> HWC float32 array."""
    pixels = eval_crop(image, image_size=image_size, crop_pct=crop_pct, interpolation=interpolation)
    scaled = pixels.astype(np.float32) / np.float32(255)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype: Any = jnp.float32) -> jax.Array:
    """uint8 pixels -> `(x / 255 - mean) / std` in float32, cast to the compute dtype.

    Runs on the device inside the jitted steps, so batches cross from the host as uint8 (a
    quarter of the bytes of float32, and no float work on the input pipeline's cores).
    """
    scaled = images.astype(jnp.float32) / 255.0
    normalized = (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return normalized.astype(dtype)


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision `center_crop`: zero-pads when the image is smaller, Python rounding of offsets."""
    crop_h, crop_w = size
    height, width = pixels.shape[:2]
    if crop_h > height or crop_w > width:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2),
                                 (0, 0)))
        height, width = pixels.shape[:2]
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return pixels[top:top + crop_h, left:left + crop_w]


def size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """224 -> (224, 224); (H, W) -> (H, W)."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def decode_and_eval_crop(encoded: bytes, name: str = "<image bytes>", **crop_kwargs) -> np.ndarray:
    """`eval_crop(load_image(...))` on encoded bytes: the evaluation pipeline's map."""
    file = io.BytesIO(encoded)
    file.name = name  # for load_image's error message
    return eval_crop(load_image(file), **crop_kwargs)
