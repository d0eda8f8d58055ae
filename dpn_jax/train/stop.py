"""SIGTERM / SIGINT as a request to save and stop, agreed by every process at the same step.

One process: a signal handler sets a flag that the loop reads after every step and while it
waits for data. Several processes: SIGTERM on any of them reaches JAX's preemption service
(started by `jax.distributed.initialize`), which picks the step every process stops at;
`should_stop(step)` is `multihost_utils.reached_preemption_sync_point`, called after every step
(no collective of ours). SIGINT there is forwarded to the same service as a SIGTERM, so Ctrl-C
on any host stops all of them at one step too.

After the stop, the process must end even if a thread of the input pipeline is stuck in a read
that never returns (a FIFO, a hung network filesystem): `exit_despite_stuck(threads, status)`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Collection, Iterator

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

STUCK_GRACE_SECONDS = 3.0


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._multi_process = jax.process_count() > 1

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        # With several processes SIGTERM belongs to JAX's preemption notifier: leave it alone.
        signals = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.signal(s, self._handle) for s in signals}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, _frame) -> None:
        self.signum = signum
        if self._multi_process:
            os.kill(
                os.getpid(), signal.SIGTERM
            )  # tell the preemption service, which all hosts hear

    def requested_locally(self) -> bool:
        """A signal reached this process (may be read at any time, e.g. while waiting for data)."""
        return self.signum is not None

    def should_stop(self, step: int) -> bool:
        """Whether every process stops after `step`; call it after every step, on every process."""
        if self._multi_process:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None


def exit_despite_stuck(candidates: Collection[threading.Thread], status: int) -> None:
    """At interpreter exit, give those of `candidates` that the exit would join a few seconds;
    if one is still running, run the exit handlers, flush the output and end the process with
    `status` without joining it.

    Why `os._exit`: a thread blocked in a read (a FIFO, a hung network filesystem) cannot be
    interrupted, and Python's exit joins every thread of a `ThreadPoolExecutor` (grain's
    readers) forever, daemon or not. `threading._register_atexit` runs this before those
    joins (its handlers run last-registered first) and only when the interpreter exits, so a
    program that goes on after training (a notebook) is never ended. `status` is what the
    program would have exited with (0 after a finished or stopped run, 1 after an error).
    """

    def exit_if_stuck() -> None:
        threads = [t for t in candidates if _joined_at_exit(t)]
        deadline = time.monotonic() + STUCK_GRACE_SECONDS
        for thread in threads:
            # orbax's threads re-raise their failure on join (a full disk, already reported)
            with contextlib.suppress(Exception):
                thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in threads if thread.is_alive()]
        if not stuck:
            return
        log.warning(
            "input threads stuck in a read (%s); exiting without waiting for them",
            ", ".join(stuck),
        )
        atexit._run_exitfuncs()  # what a normal exit runs after the joins: logging, jax, ...
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)

    threading._register_atexit(exit_if_stuck)


def _joined_at_exit(thread: threading.Thread) -> bool:
    """Whether Python's exit waits for `thread`: a non-daemon thread, or a worker of a
    `ThreadPoolExecutor` (registered in `concurrent.futures.thread._threads_queues`)."""
    from concurrent.futures import thread as executor_threads

    return not thread.daemon or thread in executor_threads._threads_queues
