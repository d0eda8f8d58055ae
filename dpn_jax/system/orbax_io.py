"""Orbax's failed reads and writes, as a user should see them: one line, not pages of tracebacks.

Orbax reads and writes arrays with tensorstore, on background threads. When the system refuses
a write (a full disk, a quota, a file size limit) tensorstore raises a ValueError carrying
`[os_error_code='28']`, orbax logs it with a traceback from each writer thread, and operations
still in flight may complete after orbax's event loop has closed, each printing a
"RuntimeError: Event loop is closed" traceback, and asyncio may log the writers' refusals
again when their tasks are collected. `quiet_about(directory)` keeps that noise out of the
user's terminal while dpn_jax works in `directory`, `ignore_failure_aftermath` after it;
`os_error_of` recovers the OSError the ValueError stands for, which the caller reports in one
line. `CHECKPOINT_LAYOUT` names the files orbax writes into a checkpoint directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")
# Every entry orbax (0.11, OCDBT format; `_sharding`, `array_metadatas/` and `commit_success.txt`
# in some versions and settings) writes into a checkpoint directory, as a regular expression
# over the paths relative to it, directories ending in "/" (`dpn_jax.system.files.check_layout`).
CHECKPOINT_LAYOUT = (
    r"(?:_CHECKPOINT_METADATA|_METADATA|_sharding|manifest\.ocdbt|commit_success\.txt"
    r"|d/(?:[0-9a-f]+)?|array_metadatas/(?:process_\d+)?"
    r"|ocdbt\.process_\d+/(?:manifest\.ocdbt|d/(?:[0-9a-f]+)?)?)"
)


def os_error_of(error: BaseException, path: str | os.PathLike) -> OSError | None:
    """The OSError a failed orbax operation stands for (about `path`), or None if it is not one."""
    if isinstance(error, OSError):
        return error
    code = _OS_ERROR_CODE.search(str(error))
    if code is None:
        return None
    ignore_failure_aftermath()
    return OSError(int(code[1]), os.strerror(int(code[1])), os.fspath(path))


class _RecordsAbout(logging.Filter):
    """Drops log records whose message or exception names `directory`."""

    def __init__(self, directory: str | os.PathLike):
        super().__init__()
        self.directory = os.fspath(Path(directory).absolute())

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return self.directory not in text


@contextlib.contextmanager
def quiet_about(directory: str | os.PathLike) -> Iterator[None]:
    """While the block runs, log records about `directory` are not shown: orbax's (through
    absl) and asyncio's about orbax's failed writer tasks."""
    loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
    records = _RecordsAbout(directory)
    for logger in loggers:
        logger.addFilter(records)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(records)


class _UnretrievedRefusals(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records for refused reads/writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return not ("never retrieved" in text and _OS_ERROR_CODE.search(text))


def ignore_failure_aftermath() -> None:
    """After a failed orbax operation (which dpn_jax reports in one line), tensorstore may still
    complete reads or writes whose results can no longer reach orbax's closed event loop: each
    prints a "RuntimeError: Event loop is closed" through `sys.excepthook`, and asyncio logs the
    other writers' refusals as "Task exception was never retrieved" when their tasks are
    collected, possibly long after `quiet_about`'s block. Both are dropped from then on."""
    if getattr(sys.excepthook, "_drops_closed_loop_errors", False):
        return
    previous = sys.excepthook

    def excepthook(kind, value, traceback) -> None:
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        previous(kind, value, traceback)

    excepthook._drops_closed_loop_errors = True
    sys.excepthook = excepthook
    logging.getLogger("asyncio").addFilter(_UnretrievedRefusals())
