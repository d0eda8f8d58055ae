"""Batches on the devices ahead of the step that needs them, fed from a background thread."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from dpn_jax.runtime.runner import Runner
from dpn_jax.train.stop import exit_despite_stuck


class FedBatch(NamedTuple):
    batch: Any  # global arrays on the mesh
    data_state: dict  # the pipeline's state just after this batch: where a resume continues
    wait_seconds: float  # how long the consumer waited for it


class _Failure(NamedTuple):
    error: BaseException


class BatchFeeder:
    """Pulls this process's batches, puts them on the mesh `ahead` batches early.

    The pipeline's `get_state()` is recorded right after each batch, so a checkpoint saved
    after a batch's step holds exactly that position, however far the feeder has read ahead.
    An error in the pipeline is raised by `next`, in the consumer's thread. Used as a context
    manager, it closes on exit, and a pipeline thread stuck in a read does not keep the
    process from exiting (`exit_despite_stuck`).
    """

    def __init__(self, batches: Iterator[dict], runner: Runner, ahead: int = 2):
        self._batches = batches
        self._runner = runner
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._closed = threading.Event()
        self._threads_before = set(threading.enumerate())
        self._thread = threading.Thread(target=self._feed, name="dpn_jax batch feeder", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        try:
            for batch in self._batches:
                item = (self._runner.put_batch(batch), self._batches.get_state())
                if not self._put(item):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(_Failure(error))

    def _put(self, item: Any) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self, interrupted: Callable[[], bool] = lambda: False) -> FedBatch | None:
        """The next batch; None if `interrupted()` turned true while waiting for it."""
        start = time.perf_counter()
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if interrupted():
                    return None
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the batch feeder stopped without an error") from None
        if isinstance(item, _Failure):
            raise item.error
        batch, data_state = item
        return FedBatch(batch, data_state, time.perf_counter() - start)

    def close(self) -> None:
        """Stop feeding and close the pipeline (its worker processes, if any)."""
        self._closed.set()
        self._thread.join(timeout=5)
        close_batches = getattr(self._batches, "close", None)
        if close_batches is not None:
            close_batches()

    def __enter__(self) -> BatchFeeder:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close()
        # The threads started while feeding (the pipeline's readers) that Python's exit would
        # wait for may be stuck in a read; idle ones end at exit, a stuck one must not block it.
        started = [t for t in threading.enumerate() if t not in self._threads_before]
        exit_despite_stuck(started, status=0 if kind is None else 1)
