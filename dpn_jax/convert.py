"""Exact mapping between timm DPN state dicts and Flax variables.

Flax modules carry timm's names, so a leaf's timm key is its path joined by dots with the leaf
renamed (`kernel`/`scale` -> `weight`, `mean`/`var` -> `running_mean`/`running_var`). Only the
layout changes: conv kernels OIHW <-> HWIO, the 1x1-conv classifier (N, C, 1, 1) <-> Dense (C, N).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from dpn_jax.dpn import DPN, MODEL_ARGS

Variables = dict[str, Any]

_LEAF_TO_TIMM = {"kernel": "weight", "scale": "weight", "bias": "bias",
                 "mean": "running_mean", "var": "running_var"}
OPTIONAL_SUFFIX = ".num_batches_tracked"


class ConversionError(ValueError):
    """A state dict that does not fit the requested DPN (names the tensor and the shapes)."""


def timm_key(path: tuple[str, ...]) -> str:
    """('features', 'conv2_1', 'c1x1_a', 'bn', 'scale') -> 'features.conv2_1.c1x1_a.bn.weight'."""
    return ".".join((*path[:-1], _LEAF_TO_TIMM[path[-1]]))


def _to_timm_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:  # Dense (C, N) -> 1x1 conv (N, C, 1, 1)
        return value.T[:, :, None, None]
    return value


def _to_flax_layout(value: np.ndarray, target_ndim: int) -> np.ndarray:
    if target_ndim == 4 and value.ndim == 4:  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if target_ndim == 2 and value.ndim in (2, 4):  # (N, C, 1, 1) or Linear (N, C) -> (C, N)
        return value.reshape(value.shape[0], -1).T
    return value


def _leaf_paths(tree: Variables) -> list[tuple[tuple[str, ...], Any]]:
    """(path without the collection name, leaf) for every params/batch_stats leaf."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


def num_classes_of(state_dict: Mapping[str, np.ndarray]) -> int:
    weight = state_dict.get("classifier.weight")
    return 0 if weight is None else int(weight.shape[0])


def abstract_variables(model: DPN) -> Variables:
    """Shapes and dtypes of `model`'s variables, without computing anything."""
    dummy = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), dummy)


def timm_to_flax(state_dict: Mapping[str, np.ndarray], name: str, **model_kwargs: Any) -> Variables:
    """Convert a timm DPN state dict to Flax variables of architecture `name`, strictly.

    Every tensor must be consumed and every shape must match; `num_batches_tracked` is optional.
    The classifier size is read from the state dict (no `classifier.*`: `num_classes=0`).
    """
    arch = name.partition(".")[0]
    if arch not in MODEL_ARGS:
        raise ConversionError(f"unknown DPN architecture {name!r}")
    model_kwargs.setdefault("num_classes", num_classes_of(state_dict))
    model = DPN(**{**MODEL_ARGS[arch], **model_kwargs})
    abstract = abstract_variables(model)

    consumed = set()
    converted: dict[str, dict] = {}
    for (collection, *path), leaf in _leaf_paths(abstract):
        key = timm_key(tuple(path))
        if key not in state_dict:
            raise ConversionError(f"missing tensor {key} (expected for {arch}, shape "
                                  f"{_to_timm_layout(np.zeros(leaf.shape, np.uint8)).shape})")
        value = _to_flax_layout(np.asarray(state_dict[key]), len(leaf.shape))
        if value.shape != leaf.shape:
            expected = _to_timm_layout(np.zeros(leaf.shape, np.uint8)).shape
            raise ConversionError(f"tensor {key} has shape {tuple(np.shape(state_dict[key]))}, "
                                  f"{arch} expects {tuple(expected)}")
        consumed.add(key)
        node = converted.setdefault(collection, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)

    extra = sorted(k for k in state_dict if k not in consumed and not k.endswith(OPTIONAL_SUFFIX))
    if extra:
        raise ConversionError(f"unexpected tensor {extra[0]} with shape "
                              f"{tuple(np.shape(state_dict[extra[0]]))} for {arch}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return converted


def flax_to_timm(variables: Variables, name: str, **model_kwargs: Any) -> dict[str, np.ndarray]:
    """The timm state dict of `variables` (loads into `timm.create_model(name)` with strict=True).

    The variables are checked against architecture `name` first. BatchNorm layers get
    `num_batches_tracked = 0`, which carries nothing in eval or with a momentum set.
    """
    state_dict: dict[str, np.ndarray] = {}
    for (_, *path), leaf in _leaf_paths({k: variables[k] for k in ("params", "batch_stats")}):
        key = timm_key(tuple(path))
        state_dict[key] = np.ascontiguousarray(_to_timm_layout(np.asarray(leaf, np.float32)))
        if path[-1] == "mean":
            state_dict[key.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
    timm_to_flax(state_dict, name, **model_kwargs)  # raises if the variables are not `name`'s
    return state_dict
