"""The model directory: what dpn-convert and train.py write and dpn-predict, dpn-evaluate,
dpn-export and `create_model(pretrained=DIR)` read. `ModelDir` is its one definition.

    DIR/metadata.json   the fields of `ModelDir` as JSON, with `format_version`
    DIR/variables/      an orbax checkpoint of {"params", "batch_stats"}

Loading checks everything a reader relies on - valid JSON, every key known and of its type, a
known architecture and architecture overrides, as many class names as classes, and variables of
the shapes that model has - and names the file and the key (or tensor) that is wrong in one
WeightsError. Directories written before `format_version` existed (version 0: preprocessing
under "pretrained_cfg") still load. Writing is atomic and replaces only a model directory
(`dpn_jax.system.files`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dpn_jax.data.labels import class_names as resolve_class_names
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.errors import ConfigError, WeightsError, first_line, is_int, is_sequence_of
from dpn_jax.models.dpn import DPN, MODEL_CONFIGS, DPNConfig
from dpn_jax.models.registry import build_dpn
from dpn_jax.system.files import atomic_output, check_layout, check_output
from dpn_jax.system.orbax_io import (
    CHECKPOINT_LAYOUT,
    ignore_failure_aftermath,
    os_error_of,
    quiet_about,
)
from dpn_jax.weights.convert import Variables, abstract_variables, check_variables, num_classes_in

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"
TRAINED_MODEL_DIR = "model"  # where train.py exports, inside its workdir
MODEL_DIR_WHAT = "a dpn_jax model directory"  # what `is_model_dir` recognises, for messages
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODEL_DIR_LAYOUT = rf"{re.escape(METADATA_FILE)}|{VARIABLES_DIR}/{CHECKPOINT_LAYOUT}?"


def _version() -> str:
    from dpn_jax.version import __version__

    return __version__


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """A DPN's weights with everything needed to rebuild, feed and label it: dpn_jax's one value
    of "a model", whatever it came from (`dpn_jax.load_model` reads a directory, a pretrained
    tag or a hub id into it; fine-tuning, `Predictor`, dpn-evaluate, dpn-export and
    `create_model(pretrained=...)` all take it from there).

    It is the on-disk format's definition too, so what a tool reads is exactly what can be
    saved; it holds the architecture (`config`), not a built Flax module, because how a module
    runs (dtype, axis_name, a headless num_classes=0) is each caller's choice (`build_model`).
    `model_kwargs` are architecture overrides (`DPNConfig` fields) on `architecture`'s row of
    `MODEL_CONFIGS`; they are kept as the fields that differ from it. Construction checks every
    field (ConfigError naming it); `load` adds the file's name and checks the variables.
    """

    architecture: str
    num_classes: int
    preprocessing: Preprocessing
    variables: Variables = dataclasses.field(repr=False, compare=False)
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    class_names: tuple[str, ...] | None = None
    source: str = ""  # where the weights came from (a file, a hub repo, a training run)
    sha256: str | None = None  # of the source file, when there is one
    dpn_jax_version: str = dataclasses.field(default_factory=_version)
    format_version: int = FORMAT_VERSION  # as read; `save` always writes FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.architecture not in MODEL_CONFIGS:
            raise ConfigError(
                f"architecture must be one of {', '.join(MODEL_CONFIGS)}, got {self.architecture!r}"
            )
        if not (is_int(self.num_classes) and self.num_classes >= 0):
            raise ConfigError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if not isinstance(self.model_kwargs, Mapping):
            raise ConfigError(
                f"model_kwargs must be a mapping of architecture fields, got {self.model_kwargs!r}"
            )
        try:
            overrides = self.config.overrides_from(MODEL_CONFIGS[self.architecture])
        except ConfigError as error:
            raise ConfigError(f"model_kwargs: {error}") from None
        object.__setattr__(self, "model_kwargs", overrides)
        if not isinstance(self.preprocessing, Preprocessing):
            raise ConfigError(f"preprocessing must be a Preprocessing, got {self.preprocessing!r}")
        if self.class_names is not None:
            if not is_sequence_of(self.class_names, None, lambda name: isinstance(name, str)):
                raise ConfigError("class_names must be a list of strings or null")
            if len(self.class_names) != self.num_classes:
                raise ConfigError(
                    f"class_names has {len(self.class_names)} names for "
                    f"num_classes={self.num_classes}"
                )
            object.__setattr__(self, "class_names", tuple(self.class_names))
        if not isinstance(self.source, str):
            raise ConfigError(f"source must be a string, got {self.source!r}")
        if self.sha256 is not None and not (
            isinstance(self.sha256, str) and _SHA256.fullmatch(self.sha256)
        ):
            raise ConfigError(
                f"sha256 must be 64 lowercase hex digits or null, got {self.sha256!r}"
            )
        if not isinstance(self.dpn_jax_version, str):
            raise ConfigError(f"dpn_jax_version must be a string, got {self.dpn_jax_version!r}")
        if not (is_int(self.format_version) and 0 <= self.format_version <= FORMAT_VERSION):
            raise ConfigError(
                f"format_version must be an integer in [0, {FORMAT_VERSION}], "
                f"got {self.format_version!r}"
            )
        if not (
            isinstance(self.variables, Mapping) and {"params", "batch_stats"} <= set(self.variables)
        ):
            raise ConfigError("variables must hold 'params' and 'batch_stats'")

    @property
    def config(self) -> DPNConfig:
        """The architecture: `architecture`'s row of `MODEL_CONFIGS` with `model_kwargs`."""
        return MODEL_CONFIGS[self.architecture].replace(**self.model_kwargs)

    def build_model(self, **module_fields: Any) -> DPN:
        """The DPN these weights are for; `module_fields` set how it runs (dtype, axis_name,
        or num_classes=0 for pooled features)."""
        return build_dpn(
            self.architecture,
            **{**self.model_kwargs, "num_classes": self.num_classes, **module_fields},
        )

    @property
    def labels(self) -> list[str] | None:
        """A name per output: `class_names`, else ImageNet-1k's for a 1000-way head, else None."""
        return resolve_class_names(self.num_classes, self.class_names)

    # --- files --------------------------------------------------------------------------------

    @staticmethod
    def check_output(path: str | os.PathLike, *, overwrite: bool) -> Path:
        """The absolute path, or an OutputError if `save(path, overwrite=overwrite)` would refuse
        (it exists and is not a model directory, ...). For failing before slow work."""
        return check_output(
            path, overwrite=overwrite, replaceable=is_model_dir, what=MODEL_DIR_WHAT
        )

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the directory atomically; an existing one is replaced only with `overwrite` and
        only if it is a model directory. Returns its absolute path."""
        import orbax.checkpoint as ocp

        host_variables = {k: jax.device_get(self.variables[k]) for k in ("params", "batch_stats")}
        with atomic_output(
            path, overwrite=overwrite, replaceable=is_model_dir, what=MODEL_DIR_WHAT, directory=True
        ) as staging:
            # Only the calling process writes (e.g. process 0 of a multi-host training run), so
            # orbax must not wait for the other processes at its barriers.
            this_process = ocp.options.MultiprocessingOptions(
                primary_host=jax.process_index(), active_processes={jax.process_index()}
            )
            with (
                quiet_about(staging),
                ocp.StandardCheckpointer(multiprocessing_options=this_process) as checkpointer,
            ):
                try:
                    checkpointer.save(staging / VARIABLES_DIR, host_variables)
                    checkpointer.wait_until_finished()
                except ValueError as error:  # tensorstore's form of a refused write
                    raise os_error_of(error, staging) or error from error
            (staging / METADATA_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return Path(os.path.abspath(Path(path).expanduser()))

    def to_json(self) -> dict[str, Any]:
        """metadata.json's content (format FORMAT_VERSION)."""
        return {
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "model_kwargs": dict(self.model_kwargs),
            "preprocessing": self.preprocessing.as_dict(),
            "class_names": None if self.class_names is None else list(self.class_names),
            "source": self.source,
            "sha256": self.sha256,
            "dpn_jax_version": self.dpn_jax_version,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelDir:
        """Read and check a model directory; a WeightsError names what is wrong and where."""
        import orbax.checkpoint as ocp

        path = Path(os.path.abspath(Path(path).expanduser()))
        metadata_file = path / METADATA_FILE
        if not path.is_dir():
            raise WeightsError(f"{path}: no such model directory")
        if not metadata_file.is_file():
            trained = path / TRAINED_MODEL_DIR
            hint = (
                f"; a train.py workdir: its model is {trained}"
                if (trained / METADATA_FILE).is_file()
                else ""
            )
            raise WeightsError(
                f"{path} is not a dpn_jax model directory (no {METADATA_FILE}){hint}"
            )
        try:
            text = metadata_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise WeightsError(f"{metadata_file}: cannot be read ({first_line(error)})") from None
        metadata = parse_metadata(text, metadata_file)
        variables_dir = path / VARIABLES_DIR
        if not variables_dir.is_dir():
            raise WeightsError(
                f"{path}: no {VARIABLES_DIR}/ directory (an incomplete model directory)"
            )
        try:
            with quiet_about(variables_dir), ocp.StandardCheckpointer() as checkpointer:
                variables = checkpointer.restore(variables_dir)
        except (OSError, ValueError) as error:
            ignore_failure_aftermath()
            reason = re.sub(r" \[tensorstore_spec=.*\]", "", first_line(error))  # a page of JSON
            raise WeightsError(
                f"{variables_dir}: not a readable orbax checkpoint ({reason})"
            ) from None
        variables = jax.tree_util.tree_map(np.asarray, variables)
        try:
            model_dir = cls(variables=variables, **metadata)
        except ConfigError as error:
            raise WeightsError(f"{metadata_file}: {error}") from None
        if num_classes_in(variables) != model_dir.num_classes:
            raise WeightsError(
                f"{metadata_file}: num_classes is {model_dir.num_classes}, the "
                f"classifier in {VARIABLES_DIR}/ has {num_classes_in(variables)}"
            )
        check_variables(variables, abstract_variables(model_dir.build_model()), str(variables_dir))
        return model_dir


def parse_metadata(text: str, origin: Path) -> dict[str, Any]:
    """`ModelDir` fields (less `variables`) from metadata.json's text, of any format version;
    WeightsError naming `origin` and the key for bad JSON, unknown or missing keys."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise WeightsError(
            f"{origin}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{origin}: expected a JSON object, got {type(raw).__name__}")
    version = raw.pop("format_version", 0)
    if not is_int(version) or version < 0:
        raise WeightsError(
            f"{origin}: format_version must be a non-negative integer, got {version!r}"
        )
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"{origin}: format_version {version} was written by a newer dpn_jax "
            f"(this one reads up to {FORMAT_VERSION}); upgrade dpn_jax"
        )
    if version == 0 and "pretrained_cfg" in raw:
        raw["preprocessing"] = raw.pop("pretrained_cfg")
    fields = {f.name for f in dataclasses.fields(ModelDir)} - {"variables", "format_version"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise WeightsError(
            f"{origin}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})"
        )
    for key in ("architecture", "num_classes", "preprocessing"):
        if key not in raw:
            raise WeightsError(f"{origin}: missing key {key!r}")
    preprocessing = raw["preprocessing"]
    if not isinstance(preprocessing, dict):
        raise WeightsError(f"{origin}: preprocessing must be an object, got {preprocessing!r}")
    known = {f.name for f in dataclasses.fields(Preprocessing)}
    unknown = sorted(set(preprocessing) - known)
    if unknown:
        raise WeightsError(f"{origin}: preprocessing: unknown key {unknown[0]!r}")
    try:
        raw["preprocessing"] = Preprocessing(**preprocessing)
    except TypeError:  # a required key is missing
        missing = sorted(
            f.name
            for f in dataclasses.fields(Preprocessing)
            if f.default is dataclasses.MISSING and f.name not in preprocessing
        )
        raise WeightsError(f"{origin}: preprocessing: missing key {missing[0]!r}") from None
    except ConfigError as error:
        raise WeightsError(f"{origin}: preprocessing: {error}") from None
    return {**raw, "format_version": version}


def is_model_dir(path: Path) -> bool:
    """Whether `path` is a model directory dpn_jax wrote and holds nothing else, at any depth:
    what `--overwrite` may replace (NotOurs names an entry dpn_jax did not write). Its
    metadata.json must be a JSON object with `dpn_jax_version` (every version writes it)."""
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        check_layout(path, _MODEL_DIR_LAYOUT)
        metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and "dpn_jax_version" in metadata
