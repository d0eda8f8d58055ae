"""The export's output directory: staged next to its destination, moved into place when complete.

Every export directory holds a manifest, `dpn_jax_export.json`, naming each file dpn-export wrote.
That is how `--overwrite` recognises an earlier export: it replaces a directory only if the
manifest is there and the directory holds nothing else, so a user's directory (or a file a user
added to an export) is never deleted. Staging and replacement are `dpn_jax.system.files`'.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpn_jax.system.files import atomic_output
from dpn_jax.system.files import check_output as check_path

MANIFEST_FILE = "dpn_jax_export.json"
MANIFEST_KIND = "dpn_jax export"
WHAT = "a dpn-export output (a directory with dpn_jax_export.json listing all it holds)"


def is_export_dir(path: Path) -> bool:
    """Whether `path` is an export directory dpn-export wrote and nothing was added to."""
    if not path.is_dir():
        return False
    try:
        listed = json.loads((path / MANIFEST_FILE).read_text())
        written = set(listed["files"]) if listed.get("kind") == MANIFEST_KIND else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return written is not None and set(_relative_files(path)) <= written | {MANIFEST_FILE}


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """The absolute output path; OutputError unless it is free or (with `overwrite`) an export."""
    return check_path(path, overwrite=overwrite, replaceable=is_export_dir, what=WHAT)


@contextlib.contextmanager
def staged_output(
    path: str | os.PathLike, manifest: dict[str, Any], overwrite: bool = False
) -> Iterator[Path]:
    """A fresh directory beside `path` to write the export into; on success it gets the manifest
    (with the list of its files) and takes `path`'s place, on failure nothing is left."""
    with atomic_output(
        path, overwrite=overwrite, replaceable=is_export_dir, what=WHAT, directory=True
    ) as staging:
        yield staging
        files = sorted(_relative_files(staging))
        (staging / MANIFEST_FILE).write_text(
            json.dumps({"kind": MANIFEST_KIND, **manifest, "files": files}, indent=2) + "\n"
        )


def _relative_files(directory: Path) -> Iterator[str]:
    """Every file, link and empty directory under `directory`, as POSIX paths relative to it."""
    for root, dirs, files in os.walk(directory):
        base = Path(root)
        links = [d for d in dirs if (base / d).is_symlink()]
        empty = [d for d in dirs if d not in links and not any((base / d).iterdir())]
        for name in (*files, *links, *empty):
            yield (base / name).relative_to(directory).as_posix()
