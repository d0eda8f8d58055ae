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
`TrainTransform` adds what timm's train transform puts after the flip: AutoAugment/RandAugment
(`dpn_jax.data.auto_augment`) or colour jitter, on the PIL image before it becomes an array.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from PIL import ExifTags, Image, ImageEnhance, ImageOps, UnidentifiedImageError

from dpn_jax.data.auto_augment import auto_augment
from dpn_jax.data.preprocessing import PIL_INTERPOLATION, check_crop_pct
from dpn_jax.errors import ConfigError, DataError
from dpn_jax.ops.resize import resize_window
from dpn_jax.system.files import special_file

# timm's train-time interpolation 'random' picks one of these per image.
RANDOM_INTERPOLATION = ("bilinear", "bicubic")

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
    path_or_file: str | os.PathLike | BinaryIO,
    max_pixels: int = MAX_DECODE_PIXELS,
    needed: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """Open an image as 8-bit RGB the way timm does (`convert('RGB')`), EXIF orientation applied.

    16-bit grayscale is scaled to 8 bit (Pillow's convert would clip it); alpha is dropped.
    Raises `UndecodableImage` (a ValueError) naming the file for missing, unreadable or corrupt
    files; a file object's name is its `name` attribute. `needed`, given the image's (width,
    height) before decoding, returns the smallest (width, height) the caller can use: a JPEG is
    then decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still has that many pixels
    (`reduced_size_box` maps coordinates to it).
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
        request = _needed_in_storage(image, needed) if needed else None
        if image.format == "JPEG" and pixels > max_pixels:
            scale = math.sqrt(pixels / max_pixels)
            bound = (int(image.width / scale), int(image.height / scale))
            request = bound if request is None else tuple(map(min, request, bound))
        if request is not None and image.format == "JPEG":
            image.draft("RGB", request)
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


def decode_image(
    encoded: bytes, name: str, needed: Callable[[int, int], tuple[int, int]] | None = None
) -> Image.Image:
    """`load_image` on an encoded image held in memory (a dataset record); `name` for errors."""
    file = io.BytesIO(encoded)
    file.name = name
    return load_image(file, needed=needed)


# EXIF orientations that turn the stored image by 90 degrees (width and height swap).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def _needed_in_storage(
    image: Image.Image, needed: Callable[[int, int], tuple[int, int]]
) -> tuple[int, int]:
    """`needed` for the displayed (EXIF-oriented) size, as a size of the stored image."""
    tagged = "exif" in image.info or "xmp" in image.info  # where getexif finds an orientation
    turned = tagged and image.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSING_ORIENTATIONS
    width, height = (image.height, image.width) if turned else image.size
    request_w, request_h = needed(width, height)
    return (request_h, request_w) if turned else (request_w, request_h)


def reduced_size_box(
    box: tuple[float, float, float, float], full_size: tuple[int, int], image: Image.Image
) -> tuple[float, float, float, float]:
    """A (left, top, right, bottom) box of the full-size image in the coordinates of `image`,
    the same image decoded at 1/s scale (s in 1, 2, 4, 8: libjpeg makes each side ceil(side /
    s), pixel i covering the full image's [i * s, (i + 1) * s))."""
    width, height = full_size
    scale = next(
        (s for s in (1, 2, 4, 8) if image.size == (-(-width // s), -(-height // s))),
        width / image.width,  # (not from a DCT scale: proportional)
    )
    return tuple(coordinate / scale for coordinate in box)


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
    """ConfigError unless both are what `Preprocessing` accepts (the checks are its own)."""
    pil_filter(interpolation)
    check_crop_pct("crop_pct", crop_pct)


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
    resample = pil_filter(interpolation)
    if (new_h, new_w) == (image.height, image.width):
        pixels = np.asarray(image.convert("RGB"))
    elif image.mode == "RGB":  # (Pillow's resize, faster)
        pixels = resize_window(image, (0, 0, image.height, image.width), (new_h, new_w), resample)
    else:
        pixels = np.asarray(image.resize((new_w, new_h), resample).convert("RGB"))
    return _center_crop(pixels, size_pair(image_size))


def reduced_eval_crop(
    encoded: bytes,
    name: str,
    *,
    image_size: int | Sequence[int],
    crop_pct: float,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """`eval_crop(decode_image(encoded, name), ...)` with a JPEG decoded at the smallest DCT
    scale that keeps at least the size timm resizes to, so the resize starts from fewer
    pixels. The geometry is timm's (the resize size and crop come from the full size); the
    pixels are close to, not equal to, timm's (tests bound the difference). An image not
    reduced (too small for 1/2, not a JPEG) takes `eval_crop`'s exact path."""
    check_eval_settings(crop_pct, interpolation)
    sizes = {}

    def needed(width: int, height: int) -> tuple[int, int]:
        new_h, new_w = eval_resize_size(height, width, image_size, crop_pct)
        sizes.update(full=(width, height), resized=(new_w, new_h))
        return new_w, new_h

    image = decode_image(encoded, name, needed)
    if image.size == sizes["full"]:
        return eval_crop(
            image, image_size=image_size, crop_pct=crop_pct, interpolation=interpolation
        )
    box = reduced_size_box((0, 0, *sizes["full"]), sizes["full"], image)
    image = image.resize(sizes["resized"], pil_filter(interpolation), box=box)
    return _center_crop(np.asarray(image), size_pair(image_size))


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
    """torchvision's `resized_crop(image, *window, size)` (+ `hflip`) -> HWC uint8 array:
    Pillow's crop and resize, as `dpn_jax.ops.resize.resize_window` computes them (the same
    bytes, faster)."""
    pixels = resize_window(image, window, size_pair(image_size), pil_filter(interpolation))
    return np.ascontiguousarray(pixels[:, ::-1]) if flip else pixels


def train_crop(
    image: Image.Image,
    *,
    image_size: int | Sequence[int],
    interpolation: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """timm's training crop: random-resized crop, then a horizontal flip with probability 1/2;
    interpolation 'random' is timm's: bilinear or bicubic."""
    window = random_resized_crop_window(image.height, image.width, rng)
    return _crop_window(image, window, image.size, image_size, interpolation, rng)


def reduced_train_crop(
    encoded: bytes, name: str, image_size: int | Sequence[int], interpolation: str, rng
) -> np.ndarray:
    """`train_crop(decode_image(encoded, name), ...)` with a JPEG decoded at the
    smallest DCT scale 1/s at which the crop window still has at least the output's pixels.

    The window is drawn from the full size (read from the header before decoding) with the
    same draws in the same order (window, interpolation, flip), so every crop's scale, aspect,
    position and flip are exactly timm's; only the pixels the window is resized from differ
    (libjpeg's 1/s image instead of the full one, mapped with a fractional box). For output
    size (H, W) the request is ceil(W * width / crop_w) x ceil(H * height / crop_h); Pillow
    picks s <= width // request_w, so width / s >= request_w, i.e. crop_w / s >= W (and so for
    the height): the resize still only shrinks. A window smaller than twice the output keeps
    s = 1, the exact path.
    """
    out_h, out_w = size_pair(image_size)
    drawn = {}

    def needed(width: int, height: int) -> tuple[int, int]:
        window = random_resized_crop_window(height, width, rng)
        drawn.update(window=window, full=(width, height))
        _, _, crop_h, crop_w = window
        return math.ceil(out_w * width / crop_w), math.ceil(out_h * height / crop_h)

    image = decode_image(encoded, name, needed)
    return _crop_window(image, drawn["window"], drawn["full"], image_size, interpolation, rng)


def _crop_window(
    image: Image.Image,
    window: tuple[int, int, int, int],
    full_size: tuple[int, int],
    image_size: int | Sequence[int],
    interpolation: str,
    rng,
) -> np.ndarray:
    """Resize `window` of the full-size image to `image_size`, flipped with probability 1/2;
    `image` is the full-size image or the same decoded at a reduced scale."""
    if interpolation == "random":  # drawn after the window, as timm's __call__ does
        interpolation = RANDOM_INTERPOLATION[int(rng.integers(len(RANDOM_INTERPOLATION)))]
    flip = rng.random() < 0.5
    if image.size == full_size:
        return resized_crop(image, window, image_size, interpolation, flip)
    top, left, crop_h, crop_w = window
    box = reduced_size_box((left, top, left + crop_w, top + crop_h), full_size, image)
    height, width = size_pair(image_size)
    crop = image.resize((width, height), pil_filter(interpolation), box=box)
    return np.asarray(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop)


def color_jitter(
    image: Image.Image, factors: Sequence[float], rng: np.random.Generator
) -> Image.Image:
    """torchvision's `ColorJitter(*factors)` (brightness, contrast, saturation[, hue]), as timm
    builds it: a random order of the four adjustments, each factor uniform in [1 - f, 1 + f]
    (clipped at 0; hue in [-f, f]), a zero factor skipped; the same Pillow operations."""
    brightness, contrast, saturation, hue = (*factors, 0.0)[:4]
    order = rng.permutation(4)
    ranges = [(max(0.0, 1.0 - f), 1.0 + f) if f else None for f in factors[:3]]
    ranges.append((-hue, hue) if hue else None)
    draws = [None if r is None else float(rng.uniform(*r)) for r in ranges]
    for index in order:
        if draws[index] is not None:
            image = _COLOR_ADJUSTMENTS[index](image, draws[index])
    return image


def _adjust_hue(image: Image.Image, hue: float) -> Image.Image:
    """torchvision's PIL `adjust_hue`: shift H of HSV, wrapping in uint8."""
    h, s, v = image.convert("HSV").split()
    shifted = np.asarray(h, np.uint8) + np.int32(hue * 255).astype(np.uint8)  # wraps, as torch's
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert(image.mode)


_COLOR_ADJUSTMENTS = (
    lambda image, f: ImageEnhance.Brightness(image).enhance(f),
    lambda image, f: ImageEnhance.Contrast(image).enhance(f),
    lambda image, f: ImageEnhance.Color(image).enhance(f),
    _adjust_hue,
)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """timm's `transforms_imagenet_train` up to `ToTensor`, per image, drawing from `rng`:
    random-resized crop + flip, then `aa` (RandAugment / AutoAugment string, its fill the
    `mean`) or else `color_jitter` (a factor for brightness, contrast and saturation, or 3-4
    factors; 0 is off), with probability `color_jitter_prob` (None: always). As in timm, colour
    jitter is ignored when `aa` is set (except timm's '3a' policies, which keep it).
    `interpolation` is a timm name or 'random'. `no_aug` is timm's `--no-aug`
    (`transforms_noaug_train`): the eval transform at the training size, crop_pct 1, no flip
    ('random' interpolation becomes bilinear, as there), no draws. Random erasing and mixup run
    on the device (`dpn_jax.data.batch_augment`). `reduced_decode` is for `from_encoded`.
    Raises ConfigError for a bad setting when built.
    """

    image_size: tuple[int, int]
    interpolation: str
    aa: str | None = None
    color_jitter: float | tuple[float, ...] = 0.0
    color_jitter_prob: float | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    no_aug: bool = False
    reduced_decode: bool = False

    def __post_init__(self):
        object.__setattr__(self, "image_size", size_pair(self.image_size))
        if self.interpolation != "random":
            pil_filter(self.interpolation)
        jitter = self.color_jitter
        jitter = (float(jitter),) * 3 if isinstance(jitter, (int, float)) else tuple(jitter)
        if len(jitter) not in (3, 4) or min(jitter) < 0 or jitter[3:4] > (0.5,):
            raise ConfigError(
                f"color_jitter {self.color_jitter!r} must be a factor >= 0 or 3-4 of them "
                "(brightness, contrast, saturation[, hue <= 0.5])"
            )
        if self.color_jitter_prob is not None and not 0 <= self.color_jitter_prob <= 1:
            raise ConfigError(f"color_jitter_prob {self.color_jitter_prob!r} must be in [0, 1]")
        object.__setattr__(self, "color_jitter", jitter)
        augment = None
        if self.aa:
            resample = None if self.interpolation == "random" else pil_filter(self.interpolation)
            augment = auto_augment(self.aa, mean=self.mean, resample=resample)
        object.__setattr__(self, "_augment", augment)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        if self.no_aug:
            return eval_crop(image, **self._no_aug_settings())
        crop = train_crop(
            image, image_size=self.image_size, interpolation=self.interpolation, rng=rng
        )
        return self._augmented(crop, rng)

    def from_encoded(self, encoded: bytes, name: str, rng: np.random.Generator) -> np.ndarray:
        """`self(decode_image(encoded, name), rng)`; with `reduced_decode`, decoding a JPEG at
        a reduced scale where the crop allows (`reduced_train_crop`, `reduced_eval_crop`
        for `no_aug`): the same crops, close pixels."""
        if not self.reduced_decode:
            return self(decode_image(encoded, name), rng)
        if self.no_aug:
            return reduced_eval_crop(encoded, name, **self._no_aug_settings())
        crop = reduced_train_crop(encoded, name, self.image_size, self.interpolation, rng)
        return self._augmented(crop, rng)

    def _no_aug_settings(self) -> dict[str, Any]:
        interpolation = "bilinear" if self.interpolation == "random" else self.interpolation
        return {"image_size": self.image_size, "crop_pct": 1.0, "interpolation": interpolation}

    def _augmented(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The cropped pixels with `aa` or colour jitter applied (on a PIL image, made only
        then)."""
        jitter = any(self.color_jitter) and (not self.aa or "3a" in self.aa)
        if self._augment is None and not jitter:
            return pixels
        image = Image.fromarray(pixels)
        if self._augment is not None:
            image = self._augment(image, rng)
        if jitter:
            if self.color_jitter_prob is None or rng.random() < self.color_jitter_prob:
                image = color_jitter(image, self.color_jitter, rng)
        return np.asarray(image)


# ---------------------------------------------------------------------------- on the device


def normalize(
    images: Any, mean: Sequence[float], std: Sequence[float], dtype: Any = np.float32
) -> jax.Array:
    """uint8 images -> `(x / 255 - mean) / std` in float32 (float64 for float64), cast to
    `dtype` (timm's ToTensor + Normalize). Meant for the inside of a jitted step; works on any
    array of [..., 3] pixels."""
    compute = jnp.promote_types(dtype, jnp.float32)
    pixels = jnp.asarray(images).astype(compute) / jnp.asarray(255, compute)
    normalized = (pixels - jnp.asarray(mean, compute)) / jnp.asarray(std, compute)
    return normalized.astype(dtype)
