"""`Preprocessing`: the one shape of the eval preprocessing a model expects.

timm's pretrained cfg data (`dpn_jax.models.dpn.PRETRAINED_CFGS`) becomes this type in one
place (`from_cfg`), model directories store it, and `resolve` turns it into what one run feeds
the model (the trainer, dpn-predict, dpn-evaluate, dpn-export). Its values are checked here
only; the image transforms (`dpn_jax.data.transforms`) use the same checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from dpn_jax.errors import ConfigError, is_int, is_number, is_sequence_of
from dpn_jax.models.registry import pretrained_cfg

# timm's interpolation names -> Pillow filters (timm.data.transforms._str_to_pil_interpolation).
PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
# Bounds on preprocessing beyond which images would not fit in memory (input_size / crop_pct is
# the resize target) or the normalised pixels would overflow: no real model comes near them.
MAX_INPUT_SIZE = 4096
MIN_CROP_PCT = 0.25
MIN_IMG_SIZE = 32  # a smaller image size is a setting's typo, not a DPN input (stride 32)
MIN_STD = 1e-3


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The eval preprocessing the weights expect (timm's pretrained cfg, without the source).

    The one shape of preprocessing in dpn_jax: a model directory stores it, `resolve` turns it
    into what one run feeds the model (dpn-predict, dpn-evaluate, dpn-export, the trainer), and
    construction is the one place its values are checked (ConfigError naming the field).
    """

    input_size: tuple[int, int]
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    test_input_size: tuple[int, int] | None = None  # timm's test-time size, if it has one
    test_crop_pct: float | None = None

    def __post_init__(self) -> None:
        for name in ("input_size", "test_input_size"):
            value = getattr(self, name)
            if value is None and name == "test_input_size":
                continue
            if not is_sequence_of(value, 2, lambda v: is_int(v) and 0 < v <= MAX_INPUT_SIZE):
                raise ConfigError(
                    f"{name} must be [height, width] (integers in [1, {MAX_INPUT_SIZE}]), "
                    f"got {value!r}"
                )
            object.__setattr__(self, name, tuple(int(v) for v in value))
        for name in ("crop_pct", "test_crop_pct"):
            value = getattr(self, name)
            if value is None and name == "test_crop_pct":
                continue
            object.__setattr__(self, name, check_crop_pct(name, value))
        if self.interpolation not in PIL_INTERPOLATION:
            raise ConfigError(
                f"interpolation must be one of {', '.join(PIL_INTERPOLATION)}, "
                f"got {self.interpolation!r}"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not is_sequence_of(value, 3, is_number) or (name == "std" and min(value) < MIN_STD):
                positive = f", >= {MIN_STD}" if name == "std" else ""
                raise ConfigError(
                    f"{name} must be 3 numbers (per RGB channel{positive}), got {value!r}"
                )
            object.__setattr__(self, name, tuple(float(v) for v in value))

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> Preprocessing:
        """The preprocessing part of a timm-style cfg (e.g. `PRETRAINED_CFGS[tag]`): the one
        conversion of timm's pretrained cfg data into this type."""
        return cls(**{field.name: cfg.get(field.name) for field in dataclasses.fields(cls)})

    @classmethod
    def of_model(cls, name: str) -> Preprocessing:
        """A tag's (or an architecture's default tag's) preprocessing, as timm publishes it."""
        return cls.from_cfg(pretrained_cfg(name))

    @staticmethod
    def check_overrides(
        img_size: int | None = None,
        crop_pct: float | None = None,
        *,
        names: Mapping[str, str] | None = None,
    ) -> None:
        """ConfigError for an override `resolve` would refuse, for failing before the model is
        read; `names` spell the settings as the caller's user wrote them (`--img-size`)."""
        names = {"img_size": "img_size", "crop_pct": "crop_pct", **(names or {})}
        if img_size is not None and not (
            is_int(img_size) and MIN_IMG_SIZE <= img_size <= MAX_INPUT_SIZE
        ):
            raise ConfigError(
                f"{names['img_size']} must be an integer in [{MIN_IMG_SIZE}, {MAX_INPUT_SIZE}], "
                f"got {img_size!r}"
            )
        if crop_pct is not None:
            check_crop_pct(names["crop_pct"], crop_pct)

    def resolve(
        self,
        img_size: int | None = None,
        crop_pct: float | None = None,
        use_test_size: bool = False,
        *,
        interpolation: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> Preprocessing:
        """What one run feeds the model, as timm's `resolve_data_config`: an explicit setting,
        else (`use_test_size`) the test-time size / crop, else the trained ones. The result is a
        square input without test-time fields (`image_size` is its side)."""
        self.check_overrides(img_size, crop_pct)
        size = self.input_size
        if use_test_size and self.test_input_size is not None:
            size = self.test_input_size
        if img_size is not None:
            size = (img_size, img_size)
        elif size[0] != size[1]:
            raise ConfigError(f"non-square input_size {size}; pass an image size (--img-size)")
        if not crop_pct:
            crop_pct = (use_test_size and self.test_crop_pct) or self.crop_pct
        return dataclasses.replace(
            self,
            input_size=size,
            crop_pct=crop_pct,
            interpolation=interpolation or self.interpolation,
            mean=self.mean if mean is None else mean,
            std=self.std if std is None else std,
            test_input_size=None,
            test_crop_pct=None,
        )

    @property
    def image_size(self) -> int:
        """The side of a square input (what `resolve` gives)."""
        height, width = self.input_size
        if height != width:
            raise ConfigError(f"non-square input_size {self.input_size}: resolve it to a size")
        return height

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_crop_pct(name: str, value: Any) -> float:
    """`value` as a float, or a ConfigError naming the setting `name`."""
    if not (is_number(value) and MIN_CROP_PCT <= value <= 1):
        raise ConfigError(f"{name} must be a number in [{MIN_CROP_PCT}, 1], got {value!r}")
    return float(value)
