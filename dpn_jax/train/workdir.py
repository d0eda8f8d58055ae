"""One run per workdir: a lock that a second `train.py` meets at once, and a killed run leaves free.

The lock is an exclusive `flock` on WORKDIR/train.lock, held for the run's lifetime. The kernel
drops it when the process ends, however it ends (kill -9 included), so a lock left by a killed
run is simply taken over; the file's content (pid, host, start time) only tells the second run
whom it met. The file stays, except in a workdir this run created and left holding nothing else
(a start-up check failed, or an interrupt came first): then the run removes the file and the
directory while it still holds the lock. A run that opened the file just before then finds, once
it has the lock, that the path no longer names the file it locked, and stops, so two runs never
hold two different files.

The path is opened without following a link and never truncated unless it is a lock file a
train.py wrote (its record, or empty if that run died first): a link, a FIFO, a directory, a
hard link to another file or a file of the user's there is refused, left as it is.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import stat
from pathlib import Path

from dpn_jax.errors import ConfigError

LOCK_FILE = "train.lock"


class WorkdirLock:
    """`with WorkdirLock(workdir):` - ConfigError if another live run holds the workdir."""

    def __init__(self, workdir: str | os.PathLike, *, created: bool = False):
        self.path = Path(workdir) / LOCK_FILE
        self.created = created  # by this run: removed on exit if nothing else is in it
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0)) or "no details recorded"
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} is in use by another train.py ({holder}); wait "
                "for it to finish or use another --workdir"
            ) from None
        if not _names(fd, self.path):
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} was just given up by another train.py starting in it; "
                "run the command again"
            )
        content = os.pread(fd, 4096, 0)
        if content and _holder(content) is None:
            os.close(fd)
            self._refuse("a file train.py did not write")
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _open(self) -> int:
        """The lock file's descriptor: created, or opened without following a link (O_NONBLOCK:
        opening a FIFO must not wait for a writer)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as error:
            if os.path.islink(self.path):
                self._refuse("a symbolic link")
            if os.path.isdir(self.path):
                self._refuse("a directory")
            raise ConfigError(f"cannot open {self.path}: {error.strerror}") from None
        info = os.fstat(fd)
        kind = None
        if not stat.S_ISREG(info.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a special file"
        elif info.st_nlink != 1:
            kind = "a file with another name"  # a hard link: writing would change the other
        if kind is not None:
            os.close(fd)
            self._refuse(kind)
        return fd

    def _refuse(self, kind: str) -> None:
        raise ConfigError(
            f"{self.path} is {kind}; train.py keeps its lock there (following no link, "
            "overwriting only its own lock file): move it away or use another --workdir"
        )

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            empty = self.created and os.listdir(self.path.parent) == [LOCK_FILE]
            if empty and _names(self._fd, self.path):  # the file we locked, nothing beside it
                self.path.unlink()
                with contextlib.suppress(OSError):  # something appeared meanwhile: it all stays
                    self.path.parent.rmdir()
            os.close(self._fd)  # releases the flock
            self._fd = None


def _names(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _holder(content: bytes) -> str | None:
    """'pid P on HOST, started TIME' from a lock file's record; None if it is not one."""
    try:
        record = json.loads(content)
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except (ValueError, KeyError, TypeError):
        return None
