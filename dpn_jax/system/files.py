"""Writing outputs so that nothing is lost: atomic, and replacing only what dpn_jax wrote.

An output (a model directory, an exported file) is written into a staging entry next to it and
moved into place when complete, so a reader sees the old version or the new one, never a
mixture, and a failure (an error, a full disk, Ctrl-C) leaves nothing behind. An existing output
is replaced only when the caller says so (`overwrite`) and only when it is recognisably one of
ours (`replaceable`); anything else - `.`, a workdir, a directory holding other files at any
depth (`check_layout`), a link - is refused with an OutputError before any work is done. Links
are never followed.

On Linux the replacement is one `renameat2(RENAME_EXCHANGE)`: there is no moment without a
version at the path. Elsewhere (or on a filesystem without it) the old version is first renamed
aside; should the process die between the two renames, the next write to that path puts it back.

Inputs are read only from regular files: `special_file` names a FIFO or a device a user's path
leads to (reading a FIFO waits for a writer forever, a device may never end).

Staging entries are named `.NAME.dpn_jax-KIND-HOST-PID-TOKEN` (KIND `tmp` or `old`, HOST a hash
of the host name). A later write to the same output removes those of a dead process on this
host - entries no other program makes - and leaves every other entry alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from dpn_jax.errors import OutputError


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and `overwrite` was not given."""


class NotOurs(Exception):
    """Raised by a `replaceable` check to name what in the output dpn_jax did not write; the
    refusal quotes it."""


# OS errors that a write to a user's path can meet through no fault of dpn_jax: reported as one
# line naming the path. Any other OSError is a bug and keeps its traceback.
USER_WRITE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.EFBIG,
        errno.ENAMETOOLONG,
        errno.ENOTDIR,
        errno.EIO,
    }
)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_file(path: str | os.PathLike) -> str | None:
    """'a FIFO', 'a character device', ... if `path` (links followed) is one, else None (a
    regular file, a directory, a missing path: their readers report those)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((kind for is_kind, kind in _SPECIAL_KINDS if is_kind(mode)), None)


def check_output(
    path: str | os.PathLike, *, overwrite: bool, replaceable: Callable[[Path], bool], what: str
) -> Path:
    """The absolute output path, or an OutputError if writing there would lose something.

    `path` may be absent (its parent is created when written), or exist, `overwrite` be given
    and `replaceable(path)` be true. `what` names what `replaceable` recognises, for the message.
    Call it before slow work; `atomic_output` checks again when it writes.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    _check_parents(path)
    if not os.path.lexists(path):
        return path
    if not overwrite:
        raise OutputExistsError(
            f"{path} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    reason = _not_ours(path, replaceable)
    if reason is not None:
        raise OutputError(
            f"refusing to replace {path}: it is not {what} ({reason}); "
            "dpn_jax replaces only what it wrote; move it away or choose another "
            "output"
        )
    return path


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    replaceable: Callable[[Path], bool],
    what: str,
    directory: bool,
) -> Iterator[Path]:
    """Yield a staging path (an empty directory, or a file name if not `directory`) next to
    `path`; when the block completes it takes `path`'s place atomically.

    On any exception the staging entry (and any parent directory created for it) is removed
    and the exception re-raised; OS errors a full disk or missing permission cause become an
    OutputError naming `path`.
    """
    path = check_output(path, overwrite=overwrite, replaceable=replaceable, what=what)
    created = None
    staging = None
    try:
        created = _make_parents(path.parent)
        _clean_leftovers(path)
        staging = _staging_name(path, "tmp")
        if directory:
            staging.mkdir()  # honours the umask, unlike mkdtemp's 0700
        yield staging
        if os.path.lexists(path):
            check_output(path, overwrite=overwrite, replaceable=replaceable, what=what)
            _replace(staging, path)
        else:
            _rename_noreplace(staging, path)
    except BaseException as error:
        for entry in (staging, created):
            if entry is not None:
                remove_failed_write(entry)
        if (
            isinstance(error, OSError)
            and not isinstance(error, OutputError)
            and error.errno in USER_WRITE_ERRNOS
        ):
            raise OutputError(
                f"cannot write {path}: {error.strerror}"
                + (f" ({error.filename})" if error.filename else "")
            ) from error
        raise


def _check_parents(path: Path) -> None:
    """An OutputError when an existing ancestor of `path` is not a directory."""
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise OutputError(f"cannot write {path}: {parent} is not a directory")
            return


def _make_parents(directory: Path) -> Path | None:
    """mkdir -p `directory`; the topmost directory it created (removed again on failure)."""
    missing = [d for d in (directory, *directory.parents) if not os.path.lexists(d)]
    directory.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def check_layout(directory: Path, layout: str) -> None:
    """NotOurs naming the first entry under `directory` (walked without following links) whose
    path relative to it - a directory's with a trailing "/" - the regular expression `layout`
    does not match in full; a link is never one of ours."""

    def walk(prefix: str) -> None:
        with os.scandir(directory / prefix) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            name = prefix + entry.name
            if entry.is_symlink():
                raise NotOurs(f"it holds {name} (a symbolic link), which dpn_jax does not write")
            if entry.is_dir(follow_symlinks=False):
                name += "/"
            if not re.fullmatch(layout, name):
                raise NotOurs(f"it holds {name}, which dpn_jax does not write")
            if name.endswith("/"):
                walk(name)

    walk("")


def _not_ours(path: Path, replaceable: Callable[[Path], bool]) -> str | None:
    """Why `path` is not an output dpn_jax may replace (for the refusal), or None if it is."""
    if path.is_symlink():
        return "a symbolic link"
    try:
        if replaceable(path):
            return None
    except NotOurs as reason:
        return str(reason)
    return _describe(path)


def _describe(path: Path) -> str:
    """'a file', 'an empty directory' or 'it holds notes.txt, src, ...' for refusals."""
    if not path.is_dir():
        return "a file" if path.is_file() else "a special file"
    try:
        names = sorted(os.listdir(path))
    except OSError as error:
        return f"unreadable: {error.strerror}"
    if not names:
        return "an empty directory"
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return "it holds " + ", ".join(names[:4]) + more


# --- staging names and leftovers -----------------------------------------------------------------


def _staging_name(path: Path, kind: str) -> Path:
    token = uuid.uuid4().hex[:8]
    return path.with_name(f".{path.name}.dpn_jax-{kind}-{_HOST}-{os.getpid()}-{token}")


def _leftover_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(
        rf"\.{re.escape(path.name)}\.dpn_jax-(?P<kind>tmp|old)"
        rf"-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[0-9a-f]{{8}}"
    )


def _clean_leftovers(path: Path) -> None:
    """Remove the staging entries of dead dpn_jax processes on this host for `path`; an `old`
    one while `path` is missing is the previous version, interrupted mid-replacement: restore it."""
    pattern = _leftover_pattern(path)
    for name in sorted(os.listdir(path.parent)):
        match = pattern.fullmatch(name)
        if not match or match["host"] != _HOST or _process_alive(int(match["pid"])):
            continue
        entry = path.parent / name
        if match["kind"] == "old" and not os.path.lexists(path):
            os.rename(entry, path)
        else:
            _remove(entry)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def remove_failed_write(entry: Path, *, quiet_s: float = 0.1, limit_s: float = 5.0) -> None:
    """Remove a failed write's `entry` (ours), and again whenever it reappears within `quiet_s`.

    The writer's other threads (tensorstore's, under orbax) may go on creating directories in
    it for a few milliseconds after the error reached us, during or after one removal. After
    `limit_s` it is left to the next write to clean up (`atomic_output` removes a dead process's
    staging entries, the checkpoint manager orbax's temporary steps).
    """
    deadline = time.monotonic() + limit_s
    while True:
        _remove(entry)
        settled = time.monotonic() + quiet_s
        while not os.path.lexists(entry):
            if time.monotonic() >= settled:
                return
            time.sleep(0.002)
        if time.monotonic() >= deadline:
            return


# --- renames ----------------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


@functools.cache
def _libc_renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 / musl >= 1.2.3, or not Linux
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    return function


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux `renameat2`; False where the C library or the filesystem does not offer it."""
    function = _libc_renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _rename_noreplace(source: Path, target: Path) -> None:
    """Move `source` to the absent `target`; FileExistsError (an OutputExistsError) if another
    process created `target` meanwhile."""
    try:
        if not _renameat2(source, target, _RENAME_NOREPLACE):
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
            os.rename(source, target)
    except FileExistsError:
        raise OutputExistsError(
            f"{target} already exists (written by another process meanwhile)"
        ) from None


def _replace(staging: Path, path: Path) -> None:
    """Put `staging` at `path` and remove what was there (already checked to be ours)."""
    if not staging.is_dir():
        os.replace(staging, path)  # atomic for files everywhere
        return
    if _renameat2(staging, path, _RENAME_EXCHANGE):
        _remove(staging)  # now the previous version
        return
    retired = _staging_name(path, "old")
    os.rename(path, retired)
    os.rename(staging, path)
    _remove(retired)
