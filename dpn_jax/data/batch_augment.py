"""timm's batch augmentations on the device: Mixup/CutMix and RandomErasing, pure JAX.

Both run inside the jitted per-device train step on that device's rows of normalised float
images (NHWC), with a key that is already per step and per device. They draw from the same
distributions as `timm.data.Mixup` and `timm.data.random_erasing.RandomErasing` (tests compare
the statistics with timm's), with static shapes throughout: boxes become masks, timm's "up to
ten attempts" become ten draws of which the first that fits is kept.

Why on the device: our batches leave the host as uint8 and are normalised in the step
(`transforms.normalize`), so the host never holds the normalised tensor timm's PrefetchLoader
erases (zero / N(0, 1) values are in normalised units) and mixes; doing it here also keeps the
host's per-image budget for decoding and the per-image augmentations (RandAugment), and the
batch-level mixing, which needs the whole batch, costs the accelerator almost nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from dpn_jax.errors import ConfigError

MIXUP_MODES = ("batch", "pair", "elem")
ERASING_MODES = ("const", "rand", "pixel")
ERASING_ATTEMPTS = 10  # timm's `RandomErasing._erase` tries ten boxes per erasure


def mixup_target(
    labels: jax.Array, num_classes: int, lam: jax.Array | float, smoothing: float
) -> jax.Array:
    """timm's `mixup_target`: smoothed one-hot targets mixed with the batch reversed.

    `lam` is a scalar or one weight per row; the result is float32 (B, num_classes).
    """
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    y1 = jnp.where(
        jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), on_value, off_value
    ).astype(jnp.float32)
    lam = jnp.reshape(jnp.asarray(lam, jnp.float32), (-1, 1))
    return y1 * lam + y1[::-1] * (1.0 - lam)


def _box_mask(height: int, width: int, top, bottom, left, right) -> jax.Array:
    """(..., H, W) booleans: rows [top, bottom) and columns [left, right) of each box."""
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    expand = lambda v: jnp.asarray(v)[..., None, None]
    return (
        (rows >= expand(top))
        & (rows < expand(bottom))
        & (cols >= expand(left))
        & (cols < expand(right))
    )


@dataclasses.dataclass(frozen=True)
class Mixup:
    """timm's `Mixup` (same arguments and defaults): `mixup(key, images, labels)` returns the
    mixed images and their float32 targets (B, num_classes).

    Row i is mixed with row B-1-i (timm's `flip(0)`). 'batch' draws one lambda (and box) for
    the batch, 'pair' one per pair (i, B-1-i), 'elem' one per row; a row left unmixed (lambda
    1, probability 1 - `prob`) keeps its image and gets lambda 1 in its target.
    """

    mixup_alpha: float = 1.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    correct_lam: bool = True
    label_smoothing: float = 0.1
    num_classes: int = 1000

    def __post_init__(self):
        if self.mode not in MIXUP_MODES:
            raise ConfigError(f"mixup mode {self.mode!r} is not one of {', '.join(MIXUP_MODES)}")
        if self.cutmix_minmax is not None:
            if (
                len(self.cutmix_minmax) != 2
                or not 0 <= self.cutmix_minmax[0] < self.cutmix_minmax[1] <= 1
            ):
                raise ConfigError(
                    f"cutmix_minmax {self.cutmix_minmax!r} must be two fractions min < max"
                )
            # timm forces cutmix_alpha = 1 when minmax boxes are on
            object.__setattr__(self, "cutmix_minmax", tuple(self.cutmix_minmax))
            object.__setattr__(self, "cutmix_alpha", 1.0)
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            raise ConfigError("mixup needs mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax")

    def __call__(
        self, key: jax.Array, images: jax.Array, labels: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        batch, height, width, _ = images.shape
        if batch % 2:
            raise ConfigError(f"mixup needs an even number of rows per device, got {batch}")
        draws = {"batch": 1, "pair": batch // 2, "elem": batch}[self.mode]
        key_lam, key_box = jax.random.split(key)
        lam, use_cutmix = self._lambdas(key_lam, draws)
        box, cut_lam = self._boxes(key_box, lam, draws, height, width)
        mixing = lam < 1.0  # timm skips a row (or the batch) whose drawn lambda is 1
        lam = jnp.where(mixing, jnp.where(use_cutmix, cut_lam, lam), 1.0)
        per_row = lambda v: self._per_row(v, batch)
        lam, use_cutmix, mixing = per_row(lam), per_row(use_cutmix), per_row(mixing)
        paste = (
            _box_mask(height, width, *map(per_row, box))[..., None]
            & use_cutmix[:, None, None, None]
        )

        compute = jnp.promote_types(images.dtype, jnp.float32)
        x, flipped = images.astype(compute), images[::-1].astype(compute)
        weight = lam.astype(compute)[:, None, None, None]
        blended = x * weight + flipped * (1.0 - weight)
        mixed = jnp.where(paste, flipped, jnp.where(use_cutmix[:, None, None, None], x, blended))
        mixed = jnp.where(mixing[:, None, None, None], mixed, x).astype(images.dtype)
        return mixed, mixup_target(labels, self.num_classes, lam, self.label_smoothing)

    def _lambdas(self, key: jax.Array, draws: int) -> tuple[jax.Array, jax.Array]:
        """timm's `_params_per_elem` for `draws` rows: lambda float32 and use_cutmix."""
        k_switch, k_cut, k_mix, k_prob = jax.random.split(key, 4)
        shape = (draws,)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = jax.random.uniform(k_switch, shape) < self.switch_prob
        else:
            use_cutmix = jnp.full(shape, self.cutmix_alpha > 0)
        lam_cut = (
            jax.random.beta(k_cut, self.cutmix_alpha, self.cutmix_alpha, shape)
            if self.cutmix_alpha > 0
            else None
        )
        lam_mix = (
            jax.random.beta(k_mix, self.mixup_alpha, self.mixup_alpha, shape)
            if self.mixup_alpha > 0
            else None
        )
        lam = (
            lam_cut
            if lam_mix is None
            else lam_mix
            if lam_cut is None
            else jnp.where(use_cutmix, lam_cut, lam_mix)
        )
        applied = jax.random.uniform(k_prob, shape) < self.prob
        return jnp.where(applied, lam, 1.0).astype(jnp.float32), use_cutmix

    def _boxes(self, key, lam, draws, height, width):
        """timm's `cutmix_bbox_and_lam`: (top, bottom, left, right) and the corrected lambda."""
        k_h, k_w, k_y, k_x = jax.random.split(key, 4)
        shape = (draws,)
        if self.cutmix_minmax is not None:  # rand_bbox_minmax
            low, high = self.cutmix_minmax
            cut_h = jax.random.randint(k_h, shape, int(height * low), int(height * high))
            cut_w = jax.random.randint(k_w, shape, int(width * low), int(width * high))
            top = jax.random.randint(k_y, shape, 0, height - cut_h + 1)
            left = jax.random.randint(k_x, shape, 0, width - cut_w + 1)
            box = (top, top + cut_h, left, left + cut_w)
        else:  # rand_bbox: a box of (1 - lam) of the area centred anywhere, clipped
            ratio = jnp.sqrt(1.0 - lam)
            cut_h = jnp.floor(height * ratio).astype(jnp.int32)
            cut_w = jnp.floor(width * ratio).astype(jnp.int32)
            cy = jax.random.randint(k_y, shape, 0, height)
            cx = jax.random.randint(k_x, shape, 0, width)
            box = (
                jnp.clip(cy - cut_h // 2, 0, height),
                jnp.clip(cy + (cut_h + 1) // 2, 0, height),
                jnp.clip(cx - cut_w // 2, 0, width),
                jnp.clip(cx + (cut_w + 1) // 2, 0, width),
            )
        if self.correct_lam or self.cutmix_minmax is not None:
            top, bottom, left, right = box
            area = ((bottom - top) * (right - left)).astype(jnp.float32)
            return box, 1.0 - area / float(height * width)
        return box, lam

    def _per_row(self, values: jax.Array, batch: int) -> jax.Array:
        """Per-draw values -> per row: the batch's one, a pair's for both of its rows, or as is."""
        if self.mode == "batch":
            return jnp.broadcast_to(values, (batch,))
        if self.mode == "pair":
            return jnp.concatenate([values, values[::-1]])
        return values


@dataclasses.dataclass(frozen=True)
class RandomErasing:
    """timm's `RandomErasing` (same arguments and defaults) on a batch of normalised images:
    `erasing(key, images)` returns the images with each one erased independently.

    Per image: with `probability`, a count in [min_count, max_count] boxes, each of area
    uniform in [min_area, max_area] of the image / count and log-uniform aspect ratio; the first
    of ten draws that fits strictly inside is placed uniformly, and no box if none fits. Filled
    with 0 ('const': the dataset mean once normalised), one N(0, 1) colour ('rand') or N(0, 1)
    per pixel ('pixel'). With `num_splits` > 1 the first batch/num_splits rows stay clean.
    """

    probability: float = 0.5
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    max_aspect: float | None = None
    mode: str = "const"
    min_count: int = 1
    max_count: int | None = None
    num_splits: int = 0

    def __post_init__(self):
        object.__setattr__(self, "mode", self.mode.lower())
        if self.mode not in ERASING_MODES:
            raise ConfigError(
                f"random erasing mode {self.mode!r} is not one of {', '.join(ERASING_MODES)}"
            )
        if self.min_aspect <= 0 or (self.max_aspect is not None and self.max_aspect <= 0):
            raise ConfigError("random erasing aspect ratios must be > 0")
        if self.min_count < 1 or (self.max_count is not None and self.max_count < self.min_count):
            raise ConfigError(
                f"random erasing counts need 1 <= min_count <= max_count, got "
                f"{self.min_count}, {self.max_count}"
            )

    def __call__(self, key: jax.Array, images: jax.Array) -> jax.Array:
        batch = images.shape[0]
        erased = jax.vmap(self._erase_one)(jax.random.split(key, batch), images)
        clean_rows = batch // self.num_splits if self.num_splits > 1 else 0
        keep = (jnp.arange(batch) < clean_rows)[:, None, None, None]
        return jnp.where(keep, images, erased)

    def _erase_one(self, key: jax.Array, image: jax.Array) -> jax.Array:
        height, width, channels = image.shape
        max_count = self.max_count or self.min_count
        max_aspect = self.max_aspect or 1 / self.min_aspect
        k_apply, k_count, *k_boxes = jax.random.split(key, 2 + max_count)
        apply = jax.random.uniform(k_apply) <= self.probability
        count = jax.random.randint(k_count, (), self.min_count, max_count + 1)
        area = float(height * width)
        for index, k_box in enumerate(k_boxes):
            k_area, k_aspect, k_top, k_left, k_fill = jax.random.split(k_box, 5)
            target = jax.random.uniform(
                k_area, (ERASING_ATTEMPTS,), minval=self.min_area, maxval=self.max_area
            )
            target = target * area / count
            aspect = jnp.exp(
                jax.random.uniform(
                    k_aspect,
                    (ERASING_ATTEMPTS,),
                    minval=math.log(self.min_aspect),
                    maxval=math.log(max_aspect),
                )
            )
            box_h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
            box_w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
            fits = (box_w < width) & (box_h < height)
            first = jnp.argmax(fits)  # the first attempt that fits (timm's loop breaks there)
            box_h, box_w = box_h[first], box_w[first]
            top = jax.random.randint(k_top, (), 0, height - box_h + 1)
            left = jax.random.randint(k_left, (), 0, width - box_w + 1)
            inside = _box_mask(height, width, top, top + box_h, left, left + box_w)
            inside = inside & apply & (index < count) & fits[first]
            fill = self._fill(k_fill, image.shape, channels).astype(image.dtype)
            image = jnp.where(inside[..., None], fill, image)
        return image

    def _fill(self, key: jax.Array, shape: tuple[int, ...], channels: int) -> Any:
        if self.mode == "pixel":
            return jax.random.normal(key, shape, jnp.float32)
        if self.mode == "rand":
            return jax.random.normal(key, (channels,), jnp.float32)
        return jnp.zeros((), jnp.float32)
