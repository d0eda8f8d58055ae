"""Model directories and pretrained weights.

A model directory is what `convert_weights.py` and the trainer write and `create_model(name,
pretrained=DIR)` reads: an orbax checkpoint of `{"params", "batch_stats"}` under `variables/`
and `metadata.json` (architecture, num_classes, DPN overrides, preprocessing, provenance).
`create_model(tag, pretrained=True)` converts timm's hub weights once into such a directory
under the cache (`$DPN_JAX_CACHE`, default `~/.cache/dpn_jax`) and reads it from there.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dpn_jax.weights.sources import Source, StateDict, read_state_dict, resolve_source, sha256_of
from dpn_jax.weights.convert import (ConversionError, Variables, abstract_variables, check_variables,
                             detect_architecture, timm_to_flax)
from dpn_jax.models.dpn import DPN, MODEL_ARGS, PRETRAINED_CFGS
from dpn_jax.models.layers import kernel_init

METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"
PRETRAINED_CFG_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std",
                       "test_input_size", "test_crop_pct")


def cache_dir() -> Path:
    """Where converted hub weights live: `$DPN_JAX_CACHE`, else `$XDG_CACHE_HOME/dpn_jax`."""
    if "DPN_JAX_CACHE" in os.environ:
        return Path(os.environ["DPN_JAX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "dpn_jax"


def pretrained_cfg_record(tag: str) -> dict[str, Any]:
    """The preprocessing part of a tag's timm pretrained cfg, as stored in metadata.json."""
    return {key: PRETRAINED_CFGS[tag][key] for key in PRETRAINED_CFG_KEYS}


# --- Model directories ------------------------------------------------------------------------

def save_model_dir(path: str | os.PathLike, variables: Variables, metadata: dict[str, Any], *,
                   overwrite: bool = False) -> None:
    """Write variables + metadata to `path` atomically: all into a sibling temporary directory,
    renamed into place at the end, so a failure leaves nothing and an existing `path` is replaced
    only with `overwrite` and only once the new one is complete."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    created = _make_parents(path.parent)
    try:
        staging = _sibling(path, "tmp")
        staging.mkdir()  # honours the umask, unlike mkdtemp's 0700
    except OSError as error:
        _remove_created(created)
        raise OSError(f"cannot write to {path.parent}: {error.strerror or error}") from None
    try:
        host_variables = {k: jax.device_get(variables[k]) for k in ("params", "batch_stats")}
        # Only the calling process writes (e.g. process 0 of a multi-host training run), so
        # orbax must not wait for the other processes at its barriers.
        this_process = ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()})
        with ocp.StandardCheckpointer(multiprocessing_options=this_process) as checkpointer:
            checkpointer.save(staging / VARIABLES_DIR, host_variables)
            checkpointer.wait_until_finished()
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        _replace_dir(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_created(created)
        raise


def _sibling(path: Path, kind: str) -> Path:
    """A hidden, unique name next to `path` (same filesystem, so renames are atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{kind}")


def _make_parents(directory: Path) -> Path | None:
    """mkdir -p `directory`; returns the topmost directory it created (to undo on failure)."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    existing = directory.parents[len(missing) - 1] if missing else directory
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write there: {existing} is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create {directory}: {error.strerror or error}") from None
    return missing[-1] if missing else None


def _remove_created(created: Path | None) -> None:
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


def _replace_dir(staging: Path, path: Path, overwrite: bool) -> None:
    if not path.exists():
        staging.rename(path)
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    retired = _sibling(path, "old")
    path.rename(retired)
    staging.rename(path)
    shutil.rmtree(retired, ignore_errors=True)


def load_model_dir(path: str | os.PathLike) -> tuple[Variables, dict[str, Any]]:
    """(variables as numpy arrays, metadata) of a model directory written by `save_model_dir`."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().absolute()
    metadata_file = path / METADATA_FILE
    if not metadata_file.is_file() or not (path / VARIABLES_DIR).is_dir():
        raise FileNotFoundError(f"{path} is not a dpn_jax model directory "
                                f"(needs {METADATA_FILE} and {VARIABLES_DIR}/)")
    metadata = json.loads(metadata_file.read_text())
    # JSON has no tuples; DPN fields (k_sec: hashable modules) and cfgs (input_size) use them.
    for section in ("model_kwargs", "pretrained_cfg"):
        metadata[section] = {k: tuple(v) if isinstance(v, list) else v
                             for k, v in (metadata.get(section) or {}).items()}
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(path / VARIABLES_DIR)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    return variables, metadata


def model_from_metadata(metadata: dict[str, Any], **overrides: Any) -> DPN:
    """The DPN a model directory's metadata describes."""
    return DPN(**{**MODEL_ARGS[metadata["architecture"]], **metadata.get("model_kwargs", {}),
                  "num_classes": metadata["num_classes"], **overrides})


# --- Converting a source ------------------------------------------------------------------------

@dataclass
class Converted:
    """A converted checkpoint, ready for `save_model_dir`."""
    variables: Variables
    metadata: dict[str, Any]
    source: Source
    state_dict: StateDict  # as read from the source (timm names)
    head_note: str | None  # set when the classifier was replaced or dropped


def convert_source(src: str, *, model: str | None = None, num_classes: int | None = None,
                   ema: bool = False, rng: jax.Array | None = None) -> Converted:
    """Read any supported source (file or hub repo), check it against `model` (an architecture
    or tag; detected from the shapes when None) and convert it; `num_classes` different from the
    checkpoint's replaces the classifier with a fresh one."""
    from dpn_jax.models.registry import split_model_name

    source = resolve_source(src)
    state_dict = read_state_dict(source.path, ema=ema)
    name = model or _hub_tag(source)
    arch, overrides = detect_architecture(state_dict, split_model_name(name)[0] if name else None)
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
        head_note = (f"classifier replaced: checkpoint has {checkpoint_classes} classes, "
                     + (f"new head for {num_classes} classes, freshly initialised for fine-tuning"
                        if num_classes else "dropped (num_classes=0: pooled features)"))
    metadata = dict(architecture=arch, num_classes=num_classes_in(variables), model_kwargs=overrides,
                    pretrained_cfg=pretrained_cfg_record(tag), class_names=None,
                    source=source.name, sha256=sha256_of(source.path), dpn_jax_version=_version())
    return Converted(variables, metadata, source, state_dict, head_note)


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


def num_classes_in(variables: Variables) -> int:
    head = variables["params"].get("classifier")
    return 0 if head is None else int(np.shape(head["bias"])[0])


def replace_head(variables: Variables, num_classes: int, rng: jax.Array | None = None,
                 in_features: int | None = None) -> Variables:
    """`variables` with a new classifier: LeCun-normal kernel and zero bias, as a fresh model's
    (num_classes=0: no classifier). `in_features` defaults to the final BatchNorm's width."""
    params = {k: v for k, v in variables["params"].items() if k != "classifier"}
    if num_classes:
        rng = jax.random.PRNGKey(0) if rng is None else rng
        width = in_features or int(np.shape(params["features"]["conv5_bn_ac"]["bn"]["scale"])[0])
        params["classifier"] = {"kernel": np.asarray(kernel_init(rng, (width, num_classes))),
                                "bias": np.zeros((num_classes,), np.float32)}
    return {**variables, "params": params}


def _version() -> str:
    from dpn_jax import __version__
    return __version__


# --- create_model(pretrained=...) ---------------------------------------------------------------

def load_pretrained(model: DPN, tag: str, pretrained: bool | str | os.PathLike,
                    rng: jax.Array | None = None) -> Variables:
    """Variables for `model` from a model directory (`pretrained=PATH`) or from the tag's hub
    weights (`pretrained=True`, converted once into the cache). A different classifier size gets
    a fresh head, with a warning."""
    path = cached_pretrained(tag) if pretrained is True else Path(pretrained)
    variables, metadata = load_model_dir(path)
    arch = tag.partition(".")[0]
    if metadata["architecture"] != arch:
        raise ConversionError(f"{path} holds a {metadata['architecture']}, not a {arch}")
    saved_kwargs = metadata.get("model_kwargs", {})
    differing = {k: v for k, v in saved_kwargs.items() if getattr(model, k) != v}
    if differing:
        raise ValueError(f"{path} was saved from a DPN with {differing}; pass the same to create_model")
    expected = abstract_variables(model)
    want = expected["params"].get("classifier")
    have = variables["params"].get("classifier")
    want_shape = tuple(want["kernel"].shape) if want else None  # (in_features, num_classes)
    if want_shape != (np.shape(have["kernel"]) if have else None):
        if want_shape:
            warnings.warn(f"{path}: checkpoint has {num_classes_in(variables)} classes, the model "
                          f"{want_shape[1]}: the classifier is freshly initialised", stacklevel=3)
        variables = replace_head(variables, want_shape[1] if want_shape else 0, rng,
                                 in_features=want_shape and want_shape[0])
    check_variables(variables, expected, str(path))
    return jax.device_put(variables)


def cached_pretrained(tag: str) -> Path:
    """The model directory of a tag's timm weights: from the cache, else downloaded and converted."""
    if not PRETRAINED_CFGS[tag]["hf_hub_id"]:
        raise ValueError(f"{tag} has no pretrained weights; pretrained tags: "
                         + ", ".join(t for t, c in PRETRAINED_CFGS.items() if c["hf_hub_id"]))
    path = cache_dir() / tag
    if not (path / METADATA_FILE).is_file():
        converted = convert_source(f"hf-hub:{PRETRAINED_CFGS[tag]['hf_hub_id']}", model=tag)
        try:
            save_model_dir(path, converted.variables, converted.metadata)
        except FileExistsError:
            pass  # another process converted it at the same time
    return path
