"""Human-readable class labels: ImageNet-1k (shipped with the package) or a checkpoint's own."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from dpn_jax.errors import WeightsError

IMAGENET_NUM_CLASSES = 1000


@dataclass(frozen=True)
class ImageNetClass:
    index: int
    synset: str  # WordNet id, e.g. 'n01440764' (the folder names of the ImageNet train set)
    name: str  # WordNet lemmas, e.g. 'tench, Tinca tinca' (what timm prints as the description)


@functools.cache
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 ImageNet-1k classes in timm's (and tfds') index order."""
    text = resources.files("dpn_jax").joinpath("data/imagenet_classes.txt").read_text("utf-8")
    classes = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            index, synset, name = line.split("\t")
            classes.append(ImageNetClass(int(index), synset, name))
    return tuple(classes)


def class_names(num_classes: int, names: Sequence[str] | None = None) -> list[str] | None:
    """Labels for a classifier's outputs: its own `names` if it has them (a fine-tuned checkpoint),
    ImageNet-1k's for a 1000-way head, else None (callers show the index).
    """
    if names is not None:
        if len(names) != num_classes:
            raise WeightsError(f"{len(names)} class names for a {num_classes}-class head")
        return list(names)
    if num_classes == IMAGENET_NUM_CLASSES:
        return [c.name for c in imagenet_classes()]
    return None
