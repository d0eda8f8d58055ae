"""A model directory's weights as a timm state dict in a safetensors file (dpn-convert --to-torch).

The file carries `dpn_jax_version` in its safetensors metadata: that is how a later
`--overwrite` knows the file is one dpn_jax wrote, and the only kind it replaces. It also
carries the architecture and its fields (`dpn_jax_architecture`, `dpn_jax_model_kwargs`), which
the shapes alone cannot tell for a non-standard DPN (e.g. the demo's groups=4): `dpn-convert`
reads them back, so an export converts back to the same model.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dpn_jax.errors import ConfigError, first_line
from dpn_jax.system.files import atomic_output, check_output
from dpn_jax.weights.sources import SAFETENSORS_SUFFIX

EXPORT_MARKER = "dpn_jax_version"
EXPORT_WHAT = "a safetensors file written by dpn-convert --to-torch"
ARCHITECTURE_KEY = "dpn_jax_architecture"
MODEL_KWARGS_KEY = "dpn_jax_model_kwargs"


def is_state_dict_export(path: Path) -> bool:
    """Whether `path` is a safetensors file dpn_jax exported (marked in its metadata)."""
    from safetensors import SafetensorError, safe_open

    if path.is_symlink() or not path.is_file():
        return False
    try:
        with safe_open(path, "np") as file:
            metadata = file.metadata() or {}
    except (OSError, SafetensorError, ValueError):
        return False
    return EXPORT_MARKER in metadata


def check_export_output(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """The absolute output path, or a ConfigError / OutputError before any work is done."""
    if not str(path).endswith(SAFETENSORS_SUFFIX):
        raise ConfigError(f"--to-torch {path}: the export is a {SAFETENSORS_SUFFIX} file")
    return check_output(
        path, overwrite=overwrite, replaceable=is_state_dict_export, what=EXPORT_WHAT
    )


def export_architecture(path: Path) -> tuple[str, dict[str, Any]] | None:
    """(architecture, model_kwargs) that an export of ours records, else None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "np") as file:
            metadata = file.metadata() or {}
        if ARCHITECTURE_KEY not in metadata:
            return None
        model_kwargs = json.loads(metadata.get(MODEL_KWARGS_KEY, "{}"))
    except (OSError, SafetensorError, ValueError):
        return None  # reading the tensors will say what is wrong
    if not isinstance(model_kwargs, dict):
        return None
    return metadata[ARCHITECTURE_KEY], model_kwargs


def save_state_dict(
    path: str | os.PathLike,
    state_dict: dict[str, np.ndarray],
    *,
    architecture: str,
    model_kwargs: Mapping[str, Any],
    overwrite: bool = False,
) -> None:
    """Write `state_dict` atomically, recording its architecture; an existing file is replaced
    only with `overwrite` and only if dpn_jax exported it. The file's mode follows the umask, as
    any file the user writes (safetensors creates it 0600)."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    from dpn_jax.version import __version__

    check_export_output(path, overwrite=overwrite)
    with atomic_output(
        path,
        overwrite=overwrite,
        replaceable=is_state_dict_export,
        what=EXPORT_WHAT,
        directory=False,
    ) as staging:
        try:
            # "format": "pt" is what transformers / timm's hub loaders expect of a torch state dict.
            save_file(
                state_dict,
                staging,
                metadata={
                    "format": "pt",
                    EXPORT_MARKER: __version__,
                    ARCHITECTURE_KEY: architecture,
                    MODEL_KWARGS_KEY: json.dumps(dict(model_kwargs)),
                },
            )
        except SafetensorError as error:  # its form of a refused write: "... (os error 28)"
            raise _os_error_of(error, staging) from None
        os.chmod(staging, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask: from /proc (Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _os_error_of(error: Exception, path: Path) -> OSError:
    """The OSError a SafetensorError reports, for atomic_output's one line about the output."""
    code = re.search(r"\(os error (\d+)\)", str(error))
    if code is None:
        return OSError(errno.EIO, first_line(error), str(path))
    return OSError(int(code[1]), os.strerror(int(code[1])), str(path))
