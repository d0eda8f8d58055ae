"""`serving.json`: what a server needs beside an exported graph to feed it and name its outputs.

The graph takes preprocessed pixels; this file says how to make them (timm's eval transform,
as `dpn-predict` runs it), the input and output tensors of each entry point, and the class
names, so a server needs neither dpn_jax nor timm.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpn_jax.data.preprocessing import Preprocessing

SERVING_FILE = "serving.json"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an exported entry point; `None` in `shape` is the dynamic batch."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    meaning: str

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "meaning": self.meaning,
        }


@dataclass(frozen=True)
class EntryPoint:
    """A function of the artifact (StableHLO: `main`; SavedModel: a signature name)."""

    name: str
    input: TensorSpec
    output: TensorSpec


@dataclass(frozen=True)
class Artifact:
    """What a format's writer made: its entry points and format details for serving.json."""

    entry_points: list[EntryPoint]
    details: dict[str, Any]


def preprocessing_record(config: Preprocessing) -> dict[str, Any]:
    """timm's eval transform for `config`, as numbers and in words."""
    resize = math.floor(config.image_size / config.crop_pct)
    return {
        "image_size": config.image_size,
        "crop_pct": config.crop_pct,
        "resize_shorter_side": resize,
        "interpolation": config.interpolation,
        "mean": list(config.mean),
        "std": list(config.std),
        "recipe": f"RGB image; resize the shorter side to {resize} ({config.interpolation}, "
        f"as Pillow); center-crop {config.image_size}x{config.image_size}; "
        f"x / 255; (x - mean) / std per channel (float32)",
    }


def write_serving_config(
    directory: Path,
    *,
    format: str,
    entry_points: list[EntryPoint],
    preprocessing: Preprocessing,
    class_names: list[str] | None,
    model: dict[str, Any],
    export: dict[str, Any],
) -> None:
    record = {
        "format": format,
        "entry_points": {
            e.name: {"input": e.input.as_json(), "output": e.output.as_json()} for e in entry_points
        },
        "preprocessing": preprocessing_record(preprocessing),
        "class_names": class_names,
        "model": model,
        "export": export,
    }
    (directory / SERVING_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_serving_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The `serving.json` of an export directory."""
    return json.loads((Path(directory) / SERVING_FILE).read_text())
