"""The export's output directory: staged next to its destination, renamed into place when complete.

Every export directory holds a manifest, `dpn_jax_export.json`, naming each file dpn-export wrote.
That is how `--overwrite` recognises an earlier export: it replaces a directory only if the
manifest is there and the directory holds nothing else, so a user's directory (or a file a user
added to an export) is never deleted.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpn_jax.errors import OutputError
from dpn_jax.weights.pretrained import _make_parents, _remove_created, _replace_dir, _sibling

MANIFEST_FILE = "dpn_jax_export.json"
MANIFEST_KIND = "dpn_jax export"


def check_output(path: Path, overwrite: bool) -> None:
    """Raise OutputError unless `path` is free, or (with `overwrite`) an export we may replace."""
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise OutputError(f"{path} already exists (pass --overwrite to replace an earlier "
                          f"dpn-export output)")
    if path.is_symlink() or not path.is_dir():
        raise OutputError(f"{path} is not a dpn-export output directory; not replacing it")
    manifest = path / MANIFEST_FILE
    try:
        listed = json.loads(manifest.read_text())
        if listed.get("kind") != MANIFEST_KIND:
            raise ValueError
        written = set(listed["files"])
    except FileNotFoundError:
        raise OutputError(f"{path} was not written by dpn-export (no {MANIFEST_FILE}); "
                          f"not replacing it") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise OutputError(f"{manifest} is not a dpn-export manifest; not replacing {path}") from None
    foreign = sorted(set(_relative_files(path)) - written - {MANIFEST_FILE})
    if foreign:
        raise OutputError(f"{path / foreign[0]} was not written by dpn-export; not replacing "
                          f"{path} (move it away, or choose another --output)")


@contextlib.contextmanager
def staged_output(path: str | os.PathLike, manifest: dict[str, Any], overwrite: bool = False
                  ) -> Iterator[Path]:
    """A fresh directory beside `path` to write the export into; on success it gets the manifest
    (with the list of its files) and replaces `path`, on failure it is removed with any parent
    directories made for it."""
    path = Path(path).expanduser().absolute()
    check_output(path, overwrite)
    try:
        created = _make_parents(path.parent)
    except OSError as error:
        raise OutputError(str(error)) from None
    staging = _sibling(path, "tmp")
    try:
        staging.mkdir()
    except OSError as error:
        _remove_created(created)
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        yield staging
        files = sorted(_relative_files(staging))
        (staging / MANIFEST_FILE).write_text(json.dumps(
            {"kind": MANIFEST_KIND, **manifest, "files": files}, indent=2) + "\n")
        check_output(path, overwrite)  # again: something may have appeared meanwhile
        _replace_dir(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_created(created)
        raise


def _relative_files(directory: Path) -> Iterator[str]:
    """Every file, link and empty directory under `directory`, as POSIX paths relative to it."""
    for root, dirs, files in os.walk(directory):
        base = Path(root)
        links = [d for d in dirs if (base / d).is_symlink()]
        empty = [d for d in dirs if d not in links and not any((base / d).iterdir())]
        for name in (*files, *links, *empty):
            yield (base / name).relative_to(directory).as_posix()
