"""Ctrl-C while a command starts: held until the command reports it, never raised in an import.

Python raises KeyboardInterrupt wherever the main thread happens to be, and dpn_jax's commands
spend their first second or more importing JAX and its family. An interrupt raised inside an
import goes wrong: a C extension's initialisation (jaxlib's, through numpy's C API) turns it
into an ImportError, which an optional import then swallows, so the command runs on as if never
interrupted (CI saw train.py train to the end after a Ctrl-C); or the half-initialised extension
ends the command with a traceback, or a crash. Nor may it be raised before the command's own
handling is in place (train.py's flags are defined at module level, outside its `try`).

So `hold_interrupts` installs a handler that holds a signal - delivers it again a moment later -
until `release_interrupts` is called from inside that handling, and afterwards whenever it
lands in an import; anywhere else it raises `SignalInterrupt`.

This module imports nothing heavy: commands install the handler before anything else.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

RESEND_AFTER_S = 0.1


class SignalInterrupt(KeyboardInterrupt):
    """A signal handled by `hold_interrupts` (a KeyboardInterrupt, as Ctrl-C's is)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_released = False


def hold_interrupts(*signals: signal.Signals) -> None:
    """Handle `signals`: held until `release_interrupts`, then raised as `SignalInterrupt`
    (held again while an import is under way)."""
    for signum in signals:
        signal.signal(signum, _handle)
    sys.unraisablehook = _send_again_if_swallowed


def release_interrupts() -> None:
    """From here on the caller catches `SignalInterrupt`: a held signal is raised within
    RESEND_AFTER_S."""
    global _released
    _released = True


def _handle(signum: int, frame) -> None:
    if not _released or _inside_import(frame):
        _send_again_later(signum)
        return
    raise SignalInterrupt(signum)


def _inside_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _send_again_later(signum: int) -> None:
    """Deliver the signal again when the code it landed in has returned (if it lands in such
    code again, this repeats); a daemon, so a command that ends before then is not held up."""
    timer = threading.Timer(RESEND_AFTER_S, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _send_again_if_swallowed(unraisable) -> None:
    """An exception raised in a callback that cannot raise (e.g. JAX's gc callback) is printed
    and dropped: send the signal again instead."""
    if isinstance(unraisable.exc_value, SignalInterrupt):
        _send_again_later(unraisable.exc_value.signum)
    else:
        sys.__unraisablehook__(unraisable)
