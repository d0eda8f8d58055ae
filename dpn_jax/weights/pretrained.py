"""Converting a checkpoint into a model directory, and `create_model`'s pretrained weights.

`create_model(name, pretrained=DIR)` reads a model directory (`ModelDir`);
`create_model(tag, pretrained=True)` converts timm's hub weights once into such a directory
under the weights cache (`dpn_jax.system.cache_dirs.weights_cache_dir`) and reads it from there.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dpn_jax.errors import ConfigError, WeightsError
from dpn_jax.models.dpn import DPN, MODEL_CONFIGS, PRETRAINED_CFGS
from dpn_jax.models.layers import kernel_init
from dpn_jax.system.cache_dirs import weights_cache_dir
from dpn_jax.system.files import OutputExistsError
from dpn_jax.weights.convert import (
    ConversionError,
    Variables,
    abstract_variables,
    check_variables,
    detect_architecture,
    num_classes_in,
    timm_to_flax,
)
from dpn_jax.weights.model_dir import METADATA_FILE, ModelDir, Preprocessing, parse_metadata
from dpn_jax.weights.sources import Source, StateDict, read_state_dict, resolve_source, sha256_of
from dpn_jax.weights.torch_export import export_architecture

# --- Converting a source ------------------------------------------------------------------------


@dataclass
class Converted:
    """A converted checkpoint, ready to `save`."""

    model_dir: ModelDir
    source: Source
    state_dict: StateDict  # as read from the source (timm names)
    head_note: str | None  # set when the classifier was replaced or dropped


def convert_source(
    src: str,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    ema: bool = False,
    rng: jax.Array | None = None,
) -> Converted:
    """Read any supported source (file or hub repo), check it against `model` (an architecture
    or tag; detected from the shapes when None) and convert it; `num_classes` different from the
    checkpoint's replaces the classifier with a fresh one."""
    from dpn_jax.models.registry import split_model_name

    source = resolve_source(src)
    state_dict = read_state_dict(source.path, ema=ema)
    recorded = export_architecture(source.path) if model is None else None
    if recorded and recorded[0] in MODEL_CONFIGS:  # an export of ours: its own architecture
        name, (arch, overrides) = recorded[0], recorded
    else:
        name = model or _hub_tag(source)
        arch, overrides = detect_architecture(
            state_dict, split_model_name(name)[0] if name else None
        )
    tag = split_model_name(name or arch)[1]
    try:
        variables = timm_to_flax(state_dict, arch, **overrides)
    except ConversionError as error:
        hint = _looks_like(state_dict, (arch, overrides))
        raise ConversionError(f"{source.name} does not fit {arch}{hint}: {error}") from None
    checkpoint_classes = num_classes_in(variables)
    head_note = None
    if num_classes is not None and num_classes != checkpoint_classes:
        variables = replace_head(variables, num_classes, rng)
        head_note = f"classifier replaced: checkpoint has {checkpoint_classes} classes, " + (
            f"new head for {num_classes} classes, freshly initialised for fine-tuning"
            if num_classes
            else "dropped (num_classes=0: pooled features)"
        )
    model_dir = ModelDir(
        architecture=arch,
        num_classes=num_classes_in(variables),
        model_kwargs=overrides,
        variables=variables,
        preprocessing=Preprocessing.from_cfg(PRETRAINED_CFGS[tag]),
        source=source.name,
        sha256=sha256_of(source.path),
    )
    return Converted(model_dir, source, state_dict, head_note)


def _looks_like(state_dict: StateDict, tried: tuple[str, dict[str, Any]]) -> str:
    """' (its shapes are those of dpn68b)' when the shapes point elsewhere than `tried`."""
    try:
        arch, overrides = detected = detect_architecture(state_dict)
    except ConversionError:
        return ""
    if detected == tried:
        return ""
    return f" (its shapes are those of {arch}{' with ' + str(overrides) if overrides else ''})"


def _hub_tag(source: Source) -> str | None:
    """`timm/dpn92.mx_in1k` -> 'dpn92.mx_in1k' when that is a known tag (its cfg applies)."""
    tag = source.hub_repo.rpartition("/")[2] if source.hub_repo else None
    return tag if tag in PRETRAINED_CFGS else None


def replace_head(
    variables: Variables,
    num_classes: int,
    rng: jax.Array | None = None,
    in_features: int | None = None,
) -> Variables:
    """`variables` with a new classifier: LeCun-normal kernel and zero bias, as a fresh model's
    (num_classes=0: no classifier). `in_features` defaults to the final BatchNorm's width."""
    params = {k: v for k, v in variables["params"].items() if k != "classifier"}
    if num_classes:
        rng = jax.random.PRNGKey(0) if rng is None else rng
        width = in_features or int(np.shape(params["features"]["conv5_bn_ac"]["bn"]["scale"])[0])
        params["classifier"] = {
            "kernel": np.asarray(kernel_init(rng, (width, num_classes))),
            "bias": np.zeros((num_classes,), np.float32),
        }
    return {**variables, "params": params}


# --- create_model(pretrained=...) ---------------------------------------------------------------


def saved_settings(pretrained: bool | str | os.PathLike) -> dict[str, Any]:
    """A model directory's architecture fields and head size from its metadata.json: what
    `create_model(pretrained=DIR)` builds unless told otherwise (a directory describes itself).
    Empty for hub weights, or when the file is unreadable (`ModelDir.load` then says why)."""
    if pretrained is True:
        return {}
    metadata_file = Path(pretrained).expanduser() / METADATA_FILE
    try:
        metadata = parse_metadata(metadata_file.read_text(encoding="utf-8"), metadata_file)
    except (OSError, UnicodeDecodeError):
        return {}
    model_kwargs = metadata.get("model_kwargs") or {}
    if not isinstance(model_kwargs, dict):
        return {}
    return {**model_kwargs, "num_classes": metadata["num_classes"]}


def load_pretrained(
    model: DPN, tag: str, pretrained: bool | str | os.PathLike, rng: jax.Array | None = None
) -> Variables:
    """Variables for `model` from a model directory (`pretrained=PATH`) or from the tag's hub
    weights (`pretrained=True`, converted once into the cache). A different classifier size gets
    a fresh head, with a warning."""
    path = cached_pretrained(tag) if pretrained is True else Path(pretrained)
    model_dir = ModelDir.load(path)
    arch = tag.partition(".")[0]
    if model_dir.architecture != arch:
        raise WeightsError(f"{path} holds a {model_dir.architecture}, not a {arch}")
    if model_dir.config != model.config:
        given = model.config.overrides_from(model_dir.config)
        raise WeightsError(
            f"{path} holds a {arch} with {model_dir.model_kwargs}; create_model was given "
            f"{given}: leave them out to build the saved architecture"
        )
    variables = model_dir.variables
    expected = abstract_variables(model)
    want = expected["params"].get("classifier")
    have = variables["params"].get("classifier")
    want_shape = tuple(want["kernel"].shape) if want else None  # (in_features, num_classes)
    if want_shape != (np.shape(have["kernel"]) if have else None):
        if want_shape:
            warnings.warn(
                f"{path}: checkpoint has {num_classes_in(variables)} classes, the model "
                f"{want_shape[1]}: the classifier is freshly initialised",
                stacklevel=3,
            )
        variables = replace_head(
            variables,
            want_shape[1] if want_shape else 0,
            rng,
            in_features=want_shape and want_shape[0],
        )
    check_variables(variables, expected, str(path))
    return jax.device_put(variables)


def cached_pretrained(tag: str) -> Path:
    """The model directory of a tag's timm weights: cached, else downloaded and converted."""
    if not PRETRAINED_CFGS[tag]["hf_hub_id"]:
        raise ConfigError(
            f"{tag} has no pretrained weights; pretrained tags: "
            + ", ".join(t for t, c in PRETRAINED_CFGS.items() if c["hf_hub_id"])
        )
    path = weights_cache_dir() / tag
    if not (path / METADATA_FILE).is_file():
        converted = convert_source(f"hf-hub:{PRETRAINED_CFGS[tag]['hf_hub_id']}", model=tag)
        try:
            converted.model_dir.save(path)
        except OutputExistsError:
            pass  # another process converted it at the same time
    return path
