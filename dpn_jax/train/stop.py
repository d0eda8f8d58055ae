"""SIGTERM / SIGINT as a request to save and stop, agreed by every process at the same step.

One process: a signal handler sets a flag that the loop reads after every step and while it
waits for data. Several processes: SIGTERM on any of them reaches JAX's preemption service
(started by `jax.distributed.initialize`), which picks the step every process stops at;
`should_stop(step)` is `multihost_utils.reached_preemption_sync_point`, called after every step
(no collective of ours). SIGINT there is forwarded to the same service as a SIGTERM, so Ctrl-C
on any host stops all of them at one step too.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils


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
