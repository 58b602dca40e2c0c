"""Dynamic batching: a bounded queue of jobs and one thread that hands batches to the model worker.

A batch starts when `max_batch_size` jobs with the same sparsity setting are waiting, or when the oldest
waiting job has waited `max_wait_s`; it holds jobs of one setting only (they run under one session). The
queue holds at most `max_pending` unfinished jobs (waiting or running); one more is refused with 429. A job
cancelled while waiting is dropped; one cancelled while running stops at its next token. Closing lets the
accepted jobs finish, then stops the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .errors import APIError

log = logging.getLogger("corematching.apps.serve")


class DrainingQueue:
    """What the schedulers share: `_unfinished` holds the accepted jobs not yet finished (guarded by the condition
    `_lock`), `_thread` runs the batches; closing refuses new jobs and waits for the accepted ones."""

    _unfinished: set | dict
    _lock: threading.Condition
    _closing: bool
    _thread: threading.Thread
    max_pending: int

    def _refuse_when_full(self) -> None:
        """Called under `_lock` before accepting a job: 503 while closing, 429 when `max_pending` are unfinished."""
        if self._closing:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if len(self._unfinished) >= self.max_pending:
            raise APIError(429, f"the server is busy: {self.max_pending} requests are already queued or "
                           "running; retry later", code="queue_full")

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._unfinished)

    def close(self, timeout_s: float = 60.0) -> bool:
        """Refuse new jobs, let the accepted ones finish (up to timeout_s), stop the thread. True if drained."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            while self._unfinished and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
            drained = not self._unfinished
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        return drained


class Scheduler(DrainingQueue):
    def __init__(self, run_batch, max_batch_size: int, max_wait_s: float, max_pending: int):
        if max_batch_size < 1 or max_pending < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_pending must be >= 1, max_wait_s >= 0")
        self.run_batch = run_batch  # callable(list[Job]) -> None; emits each job's events
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_pending = max_pending
        self._waiting: deque = deque()
        self._unfinished: set = set()
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="corematching-batcher", daemon=True)
        self.batches_run = 0
        self._thread.start()

    # ------------------------------------------------------------------------------------------ HTTP side

    def submit(self, job) -> None:
        with self._lock:
            self._refuse_when_full()
            self._unfinished.add(job)
            self._waiting.append(job)
            self._lock.notify_all()

    def finished(self, job) -> None:
        """A job is done (answered, failed or cancelled): its slot is free."""
        with self._lock:
            self._unfinished.discard(job)
            self._lock.notify_all()

    def cancel(self, job) -> None:
        job.cancel()
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                self._unfinished.discard(job)
                self._lock.notify_all()

    # ------------------------------------------------------------------------------------------ batching thread

    def _next_batch(self) -> list | None:
        with self._lock:
            while not self._waiting:
                if self._closing:
                    return None
                self._lock.wait()
            while True:
                first = self._waiting[0]
                same = [job for job in self._waiting if job.key == first.key][: self.max_batch_size]
                left = first.enqueued_at + self.max_wait_s - time.perf_counter()
                if len(same) >= self.max_batch_size or left <= 0 or self._closing:
                    break
                self._lock.wait(left)
                if not self._waiting:
                    return []
            for job in same:
                self._waiting.remove(job)
            return same

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except BaseException as error:  # a failed batch never stops the server
                log.exception("a batch of %d failed", len(batch))
                failure = APIError(500, f"the model failed on this batch ({type(error).__name__})")
                for job in batch:
                    job.emit("error", failure)
            finally:
                self.batches_run += 1
                for job in batch:
                    self.finished(job)
