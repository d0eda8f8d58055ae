"""timm's AutoAugment, RandAugment and AugMix (`timm.data.auto_augment`) on PIL images, for grain.

The same op list, magnitude scaling (`LEVEL_DENOM`, the "increasing" variants, `mstd` noise,
`mmax`), per-op probability, fill colour (the dataset mean in 0-255, timm's `img_mean`) and
policy strings as timm, so `aa='rand-m9-mstd0.5-inc1'` here is timm's `--aa rand-m9-mstd0.5-inc1`.
The ops are the same Pillow calls as timm's, so an op at a given magnitude gives timm's pixels.
What differs is only the generator: every draw (op choice, probability, magnitude noise, sign,
resampling filter) comes from the per-example NumPy generator the pipeline seeds from (seed,
process, example), in timm's order, instead of Python's and NumPy's global state.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dpn_jax.errors import ConfigError

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M is the op's level M / 10 of its range
RANDOM_RESAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


@dataclasses.dataclass(frozen=True)
class Hparams:
    """timm's `hparams` dict: fill colour, affine resampling (None: bilinear or bicubic at
    random per op, timm's default and its choice for `interpolation='random'`), translation
    range, magnitude noise (inf: uniform in [0, M]) and upper bound."""

    fill: tuple[int, ...] = (128, 128, 128)
    resample: Image.Resampling | None = None
    translate_pct: float = 0.45
    magnitude_std: float = 0.0
    magnitude_max: float | None = None


@dataclasses.dataclass(frozen=True)
class Draw:
    """What an op may draw from or needs besides its level arguments."""

    rng: np.random.Generator
    hparams: Hparams

    def negate(self, value: float) -> float:
        """timm's `_randomly_negate`: -value with probability 1/2."""
        return -value if self.rng.random() > 0.5 else value

    def resample(self) -> Image.Resampling:
        if self.hparams.resample is not None:
            return self.hparams.resample
        return RANDOM_RESAMPLE[int(self.rng.integers(len(RANDOM_RESAMPLE)))]


# --------------------------------------------------------------------- ops (timm's Pillow calls)


def _affine(img: Image.Image, matrix: tuple[float, ...], draw: Draw) -> Image.Image:
    return img.transform(
        img.size, Image.AFFINE, matrix, resample=draw.resample(), fillcolor=draw.hparams.fill
    )


def _solarize_add(img: Image.Image, add: int, draw: Draw, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int, draw: Draw) -> Image.Image:
    """Keep `bits` high bits. Zero bits (Posterize at M < 2.5, PosterizeIncreasing at M >= 10,
    e.g. in v0 and rand-m9-mstd0.5-inc1) is a black image, as Pillow < 13 made it; Pillow 13
    refuses 0 bits, so timm itself fails there with it."""
    if bits >= 8:
        return img
    return ImageOps.posterize(img, bits) if bits > 0 else img.point([0] * 256 * len(img.getbands()))


def _enhance(enhancer: type) -> Callable[..., Image.Image]:
    return lambda img, factor, draw: enhancer(img).enhance(factor)


def _desaturate(img: Image.Image, factor: float, draw: Draw) -> Image.Image:
    return ImageEnhance.Color(img).enhance(min(1.0, max(0.0, 1.0 - factor)))


def _blur_rand(img: Image.Image, factor: float, draw: Draw) -> Image.Image:
    radius = draw.rng.uniform(0.1, 2.0 * factor)
    return img.filter(ImageFilter.GaussianBlur(radius=radius))


_color, _contrast = _enhance(ImageEnhance.Color), _enhance(ImageEnhance.Contrast)
_brightness, _sharpness = _enhance(ImageEnhance.Brightness), _enhance(ImageEnhance.Sharpness)

# name -> op(img, *level args, draw); looked up per call (tests record the arguments here).
NAME_TO_OP: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": lambda img, draw: ImageOps.autocontrast(img),
    "Equalize": lambda img, draw: ImageOps.equalize(img),
    "Invert": lambda img, draw: ImageOps.invert(img),
    "Rotate": lambda img, degrees, draw: img.rotate(
        degrees, resample=draw.resample(), fillcolor=draw.hparams.fill
    ),
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize,
    "PosterizeOriginal": _posterize,
    "Solarize": lambda img, thresh, draw: ImageOps.solarize(img, thresh),
    "SolarizeIncreasing": lambda img, thresh, draw: ImageOps.solarize(img, thresh),
    "SolarizeAdd": _solarize_add,
    "Color": _color,
    "ColorIncreasing": _color,
    "Contrast": _contrast,
    "ContrastIncreasing": _contrast,
    "Brightness": _brightness,
    "BrightnessIncreasing": _brightness,
    "Sharpness": _sharpness,
    "SharpnessIncreasing": _sharpness,
    "ShearX": lambda img, factor, draw: _affine(img, (1, factor, 0, 0, 1, 0), draw),
    "ShearY": lambda img, factor, draw: _affine(img, (1, 0, 0, factor, 1, 0), draw),
    "TranslateXRel": lambda img, pct, draw: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), draw),
    "TranslateYRel": lambda img, pct, draw: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), draw),
    "Desaturate": _desaturate,
    "GaussianBlur": lambda img, radius, draw: img.filter(ImageFilter.GaussianBlur(radius=radius)),
    "GaussianBlurRand": _blur_rand,
}


# ------------------------------------------------------------- magnitude -> op arguments (timm's)


def _fraction(level: float) -> float:
    return level / LEVEL_DENOM


def _posterize_bits(level: float, draw: Draw) -> tuple[int]:
    return (int(_fraction(level) * 4),)  # 0..4 bits kept: stronger at low magnitude


def _solarize_threshold(level: float, draw: Draw) -> tuple[int]:
    return (min(256, int(_fraction(level) * 256)),)


def _enhance_factor(level: float, draw: Draw) -> tuple[float]:
    return (_fraction(level) * 1.8 + 0.1,)


def _enhance_increasing(level: float, draw: Draw) -> tuple[float]:
    return (max(0.1, 1.0 + draw.negate(_fraction(level) * 0.9)),)


def _minmax(low: float, high: float) -> Callable[[float, Draw], tuple[float]]:
    return lambda level, draw: (max(low, min(high, low + (high - low) * _fraction(level))),)


def _signed(scale: float) -> Callable[[float, Draw], tuple[float]]:
    return lambda level, draw: (draw.negate(_fraction(level) * scale),)


LEVEL_TO_ARG: dict[str, Callable[[float, Draw], tuple] | None] = {
    "AutoContrast": None,
    "Equalize": None,
    "Invert": None,
    "Rotate": _signed(30.0),
    "Posterize": _posterize_bits,
    "PosterizeIncreasing": lambda level, draw: (4 - _posterize_bits(level, draw)[0],),
    "PosterizeOriginal": lambda level, draw: (_posterize_bits(level, draw)[0] + 4,),
    "Solarize": _solarize_threshold,
    "SolarizeIncreasing": lambda level, draw: (256 - _solarize_threshold(level, draw)[0],),
    "SolarizeAdd": lambda level, draw: (min(128, int(_fraction(level) * 110)),),
    "Color": _enhance_factor,
    "ColorIncreasing": _enhance_increasing,
    "Contrast": _enhance_factor,
    "ContrastIncreasing": _enhance_increasing,
    "Brightness": _enhance_factor,
    "BrightnessIncreasing": _enhance_increasing,
    "Sharpness": _enhance_factor,
    "SharpnessIncreasing": _enhance_increasing,
    "ShearX": _signed(0.3),
    "ShearY": _signed(0.3),
    "TranslateXRel": lambda level, draw: (
        draw.negate(_fraction(level) * draw.hparams.translate_pct),
    ),
    "TranslateYRel": lambda level, draw: (
        draw.negate(_fraction(level) * draw.hparams.translate_pct),
    ),
    "Desaturate": _minmax(0.5, 1.0),
    "GaussianBlur": _minmax(0.1, 2.0),
    "GaussianBlurRand": _minmax(0.0, 1.0),
}


@dataclasses.dataclass(frozen=True)
class AugmentOp:
    """timm's `AugmentOp`: with probability `prob`, the op at `magnitude` (plus noise)."""

    name: str
    prob: float
    magnitude: float
    hparams: Hparams

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if self.prob < 1.0 and rng.random() > self.prob:
            return img
        magnitude = self.magnitude
        if self.hparams.magnitude_std == math.inf:
            magnitude = rng.uniform(0, magnitude)
        elif self.hparams.magnitude_std > 0:
            magnitude = rng.normal(magnitude, self.hparams.magnitude_std)
        magnitude = max(0.0, min(magnitude, self.hparams.magnitude_max or LEVEL_DENOM))
        draw = Draw(rng, self.hparams)
        level_fn = LEVEL_TO_ARG[self.name]
        args = level_fn(magnitude, draw) if level_fn is not None else ()
        return NAME_TO_OP[self.name](img, *args, draw=draw)


# ------------------------------------------------------------------------------- the policies


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm's `RandAugment`: `num_layers` ops chosen uniformly with replacement (or by
    `weights`, without), each applied with its probability."""

    ops: tuple[AugmentOp, ...]
    num_layers: int = 2
    weights: tuple[float, ...] | None = None

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        chosen = rng.choice(
            len(self.ops), self.num_layers, replace=self.weights is None, p=self.weights
        )
        for index in chosen:
            img = self.ops[index](img, rng)
        return img


@dataclasses.dataclass(frozen=True)
class AutoAugment:
    """timm's `AutoAugment`: one sub-policy chosen uniformly, its ops applied in order."""

    policy: tuple[tuple[AugmentOp, ...], ...]

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for op in self.policy[int(rng.integers(len(self.policy)))]:
            img = op(img, rng)
        return img


@dataclasses.dataclass(frozen=True)
class AugMix:
    """timm's `AugMixAugment`: `width` chains of `depth` ops (random 1-3 when -1) mixed with
    Dirichlet(alpha) weights, then blended with the image by Beta(alpha, alpha); `blended` is
    timm's faster approximation (one Image.blend per chain). The transform only: timm's
    split-batch JSD loss (--aug-splits, --jsd-loss) is not supported."""

    ops: tuple[AugmentOp, ...]
    alpha: float = 1.0
    width: int = 3
    depth: int = -1
    blended: bool = False

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        weights = np.float32(rng.dirichlet([self.alpha] * self.width))
        blend = np.float32(rng.beta(self.alpha, self.alpha))
        if self.blended:
            return self._blended(img, weights, blend, rng)
        mixed = np.zeros_like(np.asarray(img), dtype=np.float32)
        for weight in weights:
            mixed += weight * np.asarray(self._chain(img, rng), dtype=np.float32)
        np.clip(mixed, 0, 255.0, out=mixed)
        return Image.blend(img, Image.fromarray(mixed.astype(np.uint8)), blend)

    def _chain(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        depth = self.depth if self.depth > 0 else int(rng.integers(1, 4))
        for index in rng.choice(len(self.ops), depth, replace=True):
            img = self.ops[index](img, rng)
        return img

    def _blended(self, img, weights, blend, rng) -> Image.Image:
        """Each chain blended in turn, with the weights rescaled so the result approximates the
        basic mix (timm's `_calc_blended_weights`)."""
        original, remaining, alphas = img, 1.0, []
        for weight in (weights * blend)[::-1]:
            alphas.append(weight / remaining)
            remaining *= 1 - alphas[-1]
        for alpha in np.array(alphas[::-1], dtype=np.float32):
            img = Image.blend(img, self._chain(original, rng), alpha)
        return img


_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateYRel", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)

_ORIGINAL = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
    (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)),
    (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)


def _with_increasing_posterize(policy):
    """timm's 'r' variants: the research Posterize (more bits dropped at higher magnitude)."""
    renamed = {"Posterize": "PosterizeIncreasing", "PosterizeOriginal": "PosterizeIncreasing"}
    return tuple(tuple((renamed.get(n, n), p, m) for n, p, m in sub) for sub in policy)


AA_POLICIES = {
    "v0": _V0,
    "v0r": _with_increasing_posterize(_V0),
    "original": _ORIGINAL,
    "originalr": _with_increasing_posterize(_ORIGINAL),
    "3a": ((("Solarize", 1.0, 5),), (("Desaturate", 1.0, 10),), (("GaussianBlurRand", 1.0, 10),)),
}

RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
AUGMIX_TRANSFORMS = (
    "AutoContrast", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "Equalize", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
# timm's named transform sets ('t' section): op -> choice weight (uniform for '3a')
RAND_CHOICES = {
    "weights": {
        "Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
        "ColorIncreasing": 0.25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25,
        "SolarizeIncreasing": 0.05, "SolarizeAdd": 0.05, "ContrastIncreasing": 0.05,
        "BrightnessIncreasing": 0.05, "Equalize": 0.05, "PosterizeIncreasing": 0.05,
        "Invert": 0.05,
    },
    "3aw": {
        "SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3, "ShearX": 2,
        "ShearY": 2, "PosterizeIncreasing": 1, "AutoContrast": 1, "ColorIncreasing": 1,
        "SharpnessIncreasing": 1, "ContrastIncreasing": 1, "BrightnessIncreasing": 1,
        "Equalize": 1, "Invert": 1,
    },
    "3a": ("SolarizeIncreasing", "Desaturate", "GaussianBlur"),
}  # fmt: skip


# -------------------------------------------------------------------------------- the strings


def auto_augment(
    config_str: str, *, mean: Sequence[float], resample: Image.Resampling | None = None
) -> RandAugment | AutoAugment | AugMix:
    """timm's `aa` string -> transform, with the hparams timm's `transforms_imagenet_train`
    gives it: fill = `mean` in 0-255; affine ops resample with the train interpolation, or
    (None: timm's 'random') bilinear or bicubic at random.

    `rand-...` is RandAugment (sections m, n, p, mstd, mmax, inc, t), `augmix-...` AugMix (m, w,
    d, a, b, mstd), otherwise an AutoAugment policy (v0, v0r, original, originalr, 3a) with an
    optional mstd section. ConfigError names
    the bad part. (timm's translate_const is left out: only its absolute-pixel translations use
    it, and no policy or RandAugment set has them.)
    """
    hparams = Hparams(fill=tuple(min(255, round(255 * x)) for x in mean), resample=resample)
    name, *sections = config_str.split("-")
    if name == "rand":
        return _rand_augment(config_str, sections, hparams)
    if name in AA_POLICIES:
        options = _sections(config_str, sections, {"mstd": float})
        hparams = _with_magnitude_std(hparams, options.get("mstd", 0.0))
        return AutoAugment(
            tuple(
                tuple(AugmentOp(n, p, m, hparams) for n, p, m in sub) for sub in AA_POLICIES[name]
            )
        )
    if name == "augmix":
        return _augmix(config_str, sections, hparams)
    raise ConfigError(
        f"aa {config_str!r}: must start with 'rand' (RandAugment), 'augmix' or an AutoAugment "
        f"policy ({', '.join(AA_POLICIES)})"
    )


def _rand_augment(config_str: str, sections: list[str], hparams: Hparams) -> RandAugment:
    transform_set = [s[1:] for s in sections if s.startswith("t")]
    numeric = [s for s in sections if not s.startswith("t")]
    options = _sections(
        config_str,
        numeric,
        {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int},
    )
    hparams = _with_magnitude_std(hparams, options.get("mstd", 0.0))
    if "mmax" in options:
        hparams = dataclasses.replace(hparams, magnitude_max=options["mmax"])
    increasing = bool(options.get("inc", 0))
    names: Any = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
    if transform_set:
        choice = transform_set[0]
        if choice not in RAND_CHOICES:
            raise ConfigError(
                f"aa {config_str!r}: transform set t{choice} is not one of "
                f"{', '.join('t' + k for k in RAND_CHOICES)}"
            )
        names = RAND_CHOICES[choice]
    weights = None
    if isinstance(names, dict):
        names, weights = tuple(names), np.asarray(list(names.values()), np.float64)
        weights = tuple(weights / weights.sum())
    magnitude, prob = options.get("m", LEVEL_DENOM), options.get("p", 0.5)
    ops = tuple(AugmentOp(n, prob, magnitude, hparams) for n in names)
    num_layers = options.get("n", 2)
    if weights is not None and num_layers > len(ops):
        raise ConfigError(f"aa {config_str!r}: n{num_layers} exceeds the {len(ops)} weighted ops")
    return RandAugment(ops, num_layers, weights)


def _augmix(config_str: str, sections: list[str], hparams: Hparams) -> AugMix:
    """timm's `augment_and_mix_transform`: m (severity, 3), w (width, 3), d (depth, -1: 1-3),
    a (alpha, 1), b (blended, 0), mstd (default uniform magnitudes); translations up to 0.3."""
    kinds = {"m": int, "w": int, "d": int, "a": float, "b": int, "mstd": float}
    options = _sections(config_str, sections, kinds)
    hparams = dataclasses.replace(
        hparams, translate_pct=0.3, magnitude_std=options.get("mstd", math.inf)
    )
    ops = tuple(AugmentOp(n, 1.0, options.get("m", 3), hparams) for n in AUGMIX_TRANSFORMS)
    return AugMix(
        ops,
        alpha=options.get("a", 1.0),
        width=options.get("w", 3),
        depth=options.get("d", -1),
        blended=bool(options.get("b", 0)),
    )


def _sections(config_str: str, sections: list[str], kinds: dict[str, type]) -> dict[str, Any]:
    """'m9', 'mstd0.5' -> {'m': 9, 'mstd': 0.5}: timm's split at the first digit."""
    options = {}
    for section in sections:
        key, *value = re.split(r"(\d.*)", section)
        if not value or key not in kinds:
            raise ConfigError(
                f"aa {config_str!r}: unknown section {section!r} (sections: "
                f"{', '.join(k + 'N' for k in kinds)})"
            )
        try:
            options[key] = kinds[key](value[0])
        except ValueError:
            raise ConfigError(f"aa {config_str!r}: {section!r} is not {key} and a number") from None
    return options


def _with_magnitude_std(hparams: Hparams, mstd: float) -> Hparams:
    """timm: mstd > 100 means uniform magnitudes in [0, M]."""
    return dataclasses.replace(hparams, magnitude_std=math.inf if mstd > 100 else mstd)
