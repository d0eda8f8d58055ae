"""The errors dpn_jax reports to a user as one line: a bad setting, dataset, file or output path.

Command-line tools catch `DpnJaxError` and print its message; any other exception is a bug in
dpn_jax and keeps its traceback. Messages name what is wrong (the file, the key, the value, the
shape) and what would be accepted. Each class also derives from the built-in error it refines,
so code that catches `ValueError` or `OSError` keeps working.
"""

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any


class DpnJaxError(Exception):
    """A problem with what the user gave dpn_jax, described in one line."""


class ConfigError(DpnJaxError, ValueError):
    """A setting that is unknown, out of range or inconsistent with another one."""


class DataError(DpnJaxError, ValueError):
    """A dataset that cannot be found, read or used for the task asked."""


class WeightsError(DpnJaxError, ValueError):
    """A checkpoint file, hub repository or model directory that cannot be used."""


class OutputError(DpnJaxError, OSError):
    """An output that cannot be written: it exists and is not ours to replace, or the disk
    refused."""


# Quoted user data (class names, file names, tensor names) is cut to this many characters.
QUOTE_LIMIT = 200


def printable(text: str, limit: int | None = None) -> str:
    """`text` safe to print: every non-printable character (controls, bidi overrides, line
    breaks) written as its Python escape, e.g. ESC as `\\x1b`, since text from files may hold
    terminal control sequences (`"\\x1b]0;owned\\x07"` retitles a terminal); with `limit`, cut
    to that many characters, saying how many were left out (a class name may be megabytes)."""
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def first_line(error: BaseException) -> str:
    """'ErrorType: first line of the message', for reporting a library's error in one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def is_int(value: Any) -> bool:
    """An integer in a user's settings: `True` is not one (it is an `int` to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def is_number(value: Any) -> bool:
    """A finite real number in a user's settings (not a bool, not inf or nan): every check of a
    setting or a model directory's metadata accepts the same values."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) or math.isfinite(value)  # ints: any size


def is_sequence_of(value: Any, length: int | None, check: Callable[[Any], bool]) -> bool:
    """A list/tuple (not a string) of `length` items (any if None) that each pass `check`."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and (length is None or len(value) == length)
        and all(check(v) for v in value)
    )
