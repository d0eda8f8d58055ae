"""Exact mapping between timm DPN state dicts and Flax variables.

Flax modules carry timm's names, so a leaf's timm key is its path joined by dots with the leaf
renamed (`kernel`/`scale` -> `weight`, `mean`/`var` -> `running_mean`/`running_var`). Only the
layout changes: conv kernels OIHW <-> HWIO, the 1x1-conv classifier (N, C, 1, 1) <-> Dense (C, N).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dpn_jax.errors import WeightsError
from dpn_jax.models.dpn import DPN, MODEL_CONFIGS
from dpn_jax.models.registry import build_dpn

Variables = dict[str, Any]
Shape = tuple[int, ...]

_LEAF_TO_TIMM = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
OPTIONAL_SUFFIX = ".num_batches_tracked"


class ConversionError(WeightsError):
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


def _timm_shape(flax_shape: Shape) -> Shape:
    return tuple(_to_timm_layout(np.zeros(flax_shape, np.uint8)).shape)


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


def num_classes_in(variables: Variables) -> int:
    """The classifier size of Flax variables (0: no classifier)."""
    head = variables["params"].get("classifier")
    return 0 if head is None else int(np.shape(head["bias"])[0])


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
    if arch not in MODEL_CONFIGS:
        raise ConversionError(f"unknown DPN architecture {name!r}")
    model_kwargs.setdefault("num_classes", num_classes_of(state_dict))
    abstract = abstract_variables(build_dpn(arch, **model_kwargs))

    consumed = set()
    converted: dict[str, dict] = {}
    for (collection, *path), leaf in _leaf_paths(abstract):
        key = timm_key(tuple(path))
        if key not in state_dict:
            raise ConversionError(
                f"missing tensor {key} (expected for {arch}, shape {_timm_shape(leaf.shape)})"
            )
        value = _to_flax_layout(np.asarray(state_dict[key]), len(leaf.shape))
        if value.shape != leaf.shape:
            raise ConversionError(
                f"tensor {key} has shape {tuple(np.shape(state_dict[key]))}, "
                f"{arch} expects {_timm_shape(leaf.shape)}"
            )
        consumed.add(key)
        node = converted.setdefault(collection, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)

    extra = sorted(k for k in state_dict if k not in consumed and not k.endswith(OPTIONAL_SUFFIX))
    if extra:
        raise ConversionError(
            f"unexpected tensor {extra[0]} with shape "
            f"{tuple(np.shape(state_dict[extra[0]]))} for {arch}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
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
            state_dict[key.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros(
                (), np.int64
            )
    timm_to_flax(state_dict, name, **model_kwargs)  # raises if the variables are not `name`'s
    return state_dict


def check_variables(variables: Variables, expected: Variables, what: str) -> None:
    """Raise a ConversionError naming the first tensor (timm name, timm layout) that `variables`
    lacks, has extra or has in another shape than `expected` (e.g. `abstract_variables(model)`)."""
    have = {timm_key(tuple(path)): tuple(np.shape(v)) for (_, *path), v in _leaf_paths(variables)}
    want = {timm_key(tuple(path)): tuple(leaf.shape) for (_, *path), leaf in _leaf_paths(expected)}
    for key, shape in want.items():
        if key not in have:
            raise ConversionError(
                f"{what}: missing tensor {key} (model expects {_timm_shape(shape)})"
            )
        if have[key] != shape:
            raise ConversionError(
                f"{what}: tensor {key} has shape {_timm_shape(have[key])}, "
                f"model expects {_timm_shape(shape)}"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise ConversionError(
            f"{what}: unexpected tensor {extra[0]} with shape "
            f"{_timm_shape(have[extra[0]])} for this model"
        )


STEM_KEY = "features.conv1_1.conv.weight"
_BLOCK_KEY = re.compile(r"features\.conv([2-5])_(\d+)\.")
# Depth and growth may differ from a variant's (custom timm DPNs, tiny test models); the rest
# of the structure must match for the shapes to identify a variant.
OVERRIDABLE_FIELDS = ("k_sec", "inc_sec")


def dpn_structure(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The `DPNConfig` fields that tensor shapes show (numpy, torch or meta tensors alike).

    The stem kernel gives `small` and `num_init_features`, stage 1's bottleneck `k_r` and
    `groups`, the projections `inc_sec`, the highest block numbers `k_sec`, `c1x1_c1` the
    `b` layout. Activations leave no trace.
    """

    def shape(key: str) -> Shape | None:
        return tuple(state_dict[key].shape) if key in state_dict else None

    stem = shape(STEM_KEY)
    if stem is None or len(stem) != 4:
        first = ", ".join(list(state_dict)[:3]) or "none"
        raise ConversionError(f"not a DPN state dict: no 4-d {STEM_KEY} (first keys: {first})")
    small = stem[2] == 3
    depths: dict[int, int] = {}
    for key in state_dict:
        if m := _BLOCK_KEY.match(key):
            depths[int(m[1])] = max(depths.get(int(m[1]), 0), int(m[2]))
    bottleneck = shape("features.conv2_1.c1x1_a.conv.weight")
    grouped = shape("features.conv2_1.c3x3_b.conv.weight")

    def growth(stage: int) -> int | None:
        proj = shape(f"features.conv{stage + 2}_1.c1x1_w_s{1 if stage == 0 else 2}.conv.weight")
        bw = (64 << stage) * (1 if small else 4)
        return None if proj is None else (proj[0] - bw) // 2

    return {
        "small": small,
        "num_init_features": stem[0],
        "k_r": bottleneck and bottleneck[0],
        "groups": grouped and grouped[0] // grouped[1],
        "b": "features.conv2_1.c1x1_c1.weight" in state_dict,
        "k_sec": tuple(depths.get(s, 0) for s in (2, 3, 4, 5)),
        "inc_sec": tuple(growth(i) for i in range(4)),
    }


def detect_architecture(
    state_dict: Mapping[str, Any], arch: str | None = None
) -> tuple[str, dict[str, Any]]:
    """(architecture, `DPNConfig` overrides) that fit the tensor shapes.

    A variant whose structure matches exactly gives no overrides; one that differs only in
    `k_sec` / `inc_sec` gives them as overrides, if it is the only such variant (dpn48b and
    dpn68b differ only in depth and activation: pass `arch` then). With `arch` given and no
    fit, returns (arch, {}) so that the strict conversion names the offending tensor.
    """
    found = dpn_structure(state_dict)
    candidates = [arch] if arch else list(MODEL_CONFIGS)

    def matches(name: str, fields) -> bool:
        return all(getattr(MODEL_CONFIGS[name], f) == found[f] for f in fields)

    exact = [name for name in candidates if matches(name, found)]
    if exact:
        return exact[0], {}
    fixed = [f for f in found if f not in OVERRIDABLE_FIELDS]
    plausible = all(found["k_sec"]) and None not in found["inc_sec"]
    near = [name for name in candidates if plausible and matches(name, fixed)]
    if len(near) == 1:
        return near[0], {
            f: found[f]
            for f in OVERRIDABLE_FIELDS
            if getattr(MODEL_CONFIGS[near[0]], f) != found[f]
        }
    if arch:
        return arch, {}
    described = ", ".join(f"{k}={v}" for k, v in found.items())
    if near:
        raise ConversionError(
            f"DPN state dict ({described}) could be {' or '.join(near)} "
            "(activations are not visible in shapes): pass --model"
        )
    raise ConversionError(f"DPN state dict of no known variant: {described}")


def detect_variant(state_dict: Mapping[str, Any]) -> str:
    """The `MODEL_CONFIGS` architecture whose structure the shapes show exactly (dpn48b, the only
    variant with SiLU, is also the only one with its block counts)."""
    arch, overrides = detect_architecture(state_dict)
    if overrides:
        raise ConversionError(f"not a standard variant: a {arch} with {overrides}")
    return arch
