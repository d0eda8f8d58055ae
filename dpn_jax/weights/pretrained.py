"""Converting a checkpoint into a model directory, and `load_model`, the one way to read a model.

`load_model(source)` reads a model directory, a pretrained tag or a hub id into a `ModelDir`;
timm's hub weights are converted once into a directory under the weights cache
(`dpn_jax.system.cache_dirs.weights_cache_dir`) and read from there. `create_model(name,
pretrained=...)` builds its DPN from what `load_model` read (`create_pretrained`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.errors import ConfigError, WeightsError
from dpn_jax.models.dpn import DPN, MODEL_CONFIGS, PRETRAINED_CFGS
from dpn_jax.models.layers import kernel_init
from dpn_jax.models.registry import build_dpn, split_model_name
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
from dpn_jax.weights.model_dir import METADATA_FILE, ModelDir
from dpn_jax.weights.sources import (
    HUB_PREFIX,
    TIMM_HUB_OWNER,
    Source,
    StateDict,
    read_state_dict,
    resolve_source,
    sha256_of,
)
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
        preprocessing=Preprocessing.of_model(tag),
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


# --- Loading a model -----------------------------------------------------------------------------


def load_model(source: str | os.PathLike) -> ModelDir:
    """The one loader: a model (weights, architecture, preprocessing, class names) from
    - a model directory (dpn-convert's or train.py's output; a `Path` is always one, a string
      when that path exists),
    - a hub id (`hf-hub:timm/dpn92.mx_in1k`, `timm/dpn92.mx_in1k`, `hf-hub:owner/repo`), or
    - a pretrained tag or architecture (`dpn68b.ra_in1k`, `dpn92`: its default tag).
    timm's published weights are converted once into the weights cache and read from there;
    another hub repository is converted on each load. WeightsError (one line) when `source` is
    none of these.
    """
    if isinstance(source, os.PathLike):
        return ModelDir.load(source)
    if not source.startswith(HUB_PREFIX) and Path(source).expanduser().exists():
        return ModelDir.load(source)
    tag = _tag_of_hub_id(source)
    if tag is None and source.startswith((HUB_PREFIX, TIMM_HUB_OWNER)):
        return convert_source(source).model_dir
    if tag is None:
        try:
            tag = split_model_name(source)[1]
        except ConfigError as error:
            raise WeightsError(
                f"{source}: no such model directory, and not a pretrained model: {error}"
            ) from None
    return ModelDir.load(cached_pretrained(tag))


def _tag_of_hub_id(source: str) -> str | None:
    """'hf-hub:timm/dpn92.mx_in1k' (or without the prefix) -> 'dpn92.mx_in1k': timm's published
    weights, which the weights cache keeps."""
    repo = source.removeprefix(HUB_PREFIX)
    return next((t for t, c in PRETRAINED_CFGS.items() if c["hf_hub_id"] == repo), None)


def pretrained_hub_id(name: str) -> str:
    """`hf-hub:timm/...` of a tag's (or an architecture's default tag's) timm weights: what
    `pretrained=True` and `--pretrained` load, never mistaken for a local directory."""
    return f"{HUB_PREFIX}{_hub_id(split_model_name(name)[1])}"


def _hub_id(tag: str) -> str:
    """The hub repository of a tag's timm weights; ConfigError for a tag that has none."""
    hub_id = PRETRAINED_CFGS[tag]["hf_hub_id"]
    if not hub_id:
        raise ConfigError(
            f"{tag} has no pretrained weights; pretrained tags: "
            + ", ".join(t for t, c in PRETRAINED_CFGS.items() if c["hf_hub_id"])
        )
    return hub_id


# --- create_model(pretrained=...) ---------------------------------------------------------------


def create_pretrained(
    name: str,
    pretrained: bool | str | os.PathLike,
    rng: jax.Array | None = None,
    **kwargs: Any,
) -> tuple[DPN, Variables, ModelDir]:
    """`create_model(name, pretrained=...)` with the model it loaded: the tag's hub weights for
    True, else the model directory `pretrained` names. The model describes itself: its
    architecture fields and head size are the defaults `kwargs` may override."""
    source = pretrained_hub_id(name) if pretrained is True else Path(pretrained)
    model_dir = load_model(source)
    arch = split_model_name(name)[0]
    if model_dir.architecture != arch:
        raise WeightsError(f"{source} holds a {model_dir.architecture}, not a {arch}")
    saved = {**model_dir.model_kwargs, "num_classes": model_dir.num_classes}
    model = build_dpn(name, **{**saved, **kwargs})
    return model, fit_variables(model, model_dir, str(source), rng), model_dir


def fit_variables(
    model: DPN, model_dir: ModelDir, origin: str, rng: jax.Array | None = None
) -> Variables:
    """`model_dir`'s variables for `model`, which must be the same architecture; a different
    classifier size gets a fresh head, with a warning."""
    if model_dir.config != model.config:
        given = model.config.overrides_from(model_dir.config)
        raise WeightsError(
            f"{origin} holds a {model_dir.architecture} with {model_dir.model_kwargs}; "
            f"create_model was given {given}: leave them out to build the saved architecture"
        )
    variables = model_dir.variables
    expected = abstract_variables(model)
    want = expected["params"].get("classifier")
    have = variables["params"].get("classifier")
    want_shape = tuple(want["kernel"].shape) if want else None  # (in_features, num_classes)
    if want_shape != (np.shape(have["kernel"]) if have else None):
        if want_shape:
            warnings.warn(
                f"{origin}: checkpoint has {num_classes_in(variables)} classes, the model "
                f"{want_shape[1]}: the classifier is freshly initialised",
                stacklevel=4,  # create_model's caller
            )
        variables = replace_head(
            variables,
            want_shape[1] if want_shape else 0,
            rng,
            in_features=want_shape and want_shape[0],
        )
    check_variables(variables, expected, origin)
    return jax.device_put(variables)


def cached_pretrained(tag: str) -> Path:
    """The model directory of a tag's timm weights: cached, else downloaded and converted."""
    hub_id = _hub_id(tag)
    path = weights_cache_dir() / tag
    if not (path / METADATA_FILE).is_file():
        converted = convert_source(f"{HUB_PREFIX}{hub_id}", model=tag)
        try:
            converted.model_dir.save(path)
        except OutputExistsError:
            pass  # another process converted it at the same time
    return path
