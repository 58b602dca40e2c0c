"""The server's scheduler with iteration-level batching (`corematching serve --batching continuous`): one thread
runs the ContinuousBatcher's steps; jobs from the HTTP side become Sequences and their outcomes go back as events."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from .continuous import ContinuousBatcher
from .errors import APIError
from .jobs import Outcome, Usage
from .prompt_cache import prompt_key
from .scheduler import DrainingQueue
from .sequence import MemoryRefused, Sequence

log = logging.getLogger("corematching.apps.serve")


class ContinuousScheduler(DrainingQueue):
    """The server's scheduler with iteration-level batching (`corematching serve --batching continuous`): the
    interface of scheduler.Scheduler (submit, cancel, finished, pending, close), one thread running the
    ContinuousBatcher's steps. A request that could never fit the KV budget, or one more than `max_pending`
    unfinished ones, gets 429; a client that goes away cancels its request at the next step (its text so far is
    not sent again, and it is reported once)."""

    def __init__(self, worker, max_batch_size: int, max_pending: int, kv_budget_bytes: int | None = None,
                 join_wait_steps: int = 0):
        if max_batch_size < 1 or max_pending < 1:
            raise ValueError("max_batch_size and max_pending must be >= 1")
        self.worker = worker
        self.batcher = ContinuousBatcher(worker.model, max_batch_size, kv_budget_bytes, worker.pad_id,
                                         join_wait_steps=join_wait_steps, prompt_cache=worker.prompt_cache)
        self.max_pending = max_pending
        self._unfinished: dict = {}  # job -> its Sequence, until it is reported
        self._lock = threading.Condition()
        self._closing = False
        self._rates: deque = deque(maxlen=64)  # (time, tokens generated so far) after recent steps
        self.batches_run = 0  # decode steps run
        self._thread = threading.Thread(target=self._loop, name="corematching-continuous", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------------------------------- HTTP side

    def submit(self, job) -> None:
        request = job.request
        with self._lock:
            self._refuse_when_full()
            sequence = Sequence(
                inputs=self.worker.batch_inputs([job]), max_tokens=request.max_tokens, method=request.method,
                temperature=request.temperature, top_p=request.top_p, seed=request.seed, stop=list(request.stop),
                eos_ids=set() if getattr(request, "ignore_eos", False) else set(self.worker.eos_ids),
                tokenizer=self.worker.tokenizer, tag=job, submitted_at=job.enqueued_at,
                cache_key=prompt_key(job) if self.worker.prompt_cache is not None and request.images else None,
                on_text=lambda piece: job.emit("text", piece), on_done=self._report)
            try:
                self.batcher.submit(sequence)
            except MemoryRefused as error:
                raise APIError(429, str(error), code="kv_cache_full") from None
            self._unfinished[job] = sequence
            self._lock.notify_all()

    def cancel(self, job) -> None:
        job.cancel()
        with self._lock:
            sequence = self._unfinished.get(job)
            if sequence is not None:
                self.batcher.cancel(sequence)
            self._lock.notify_all()

    def finished(self, job) -> None:
        with self._lock:
            self._unfinished.pop(job, None)
            self._lock.notify_all()

    def metrics(self) -> dict:
        values = self.batcher.metrics()
        values["unfinished_requests"] = self.pending
        rates = list(self._rates)
        if len(rates) >= 2 and rates[-1][0] > rates[0][0]:
            values["tokens_per_second"] = (rates[-1][1] - rates[0][1]) / (rates[-1][0] - rates[0][0])
        else:
            values["tokens_per_second"] = 0.0
        return values

    # -------------------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self.batcher.idle and not self._closing:
                    self._lock.wait()
                if self.batcher.idle and self._closing:
                    break
            try:
                self.batcher.step()
            except Exception:  # the model failed: every request in flight gets a 500, the loop goes on
                log.exception("a decode step failed")
                self.batcher.fail_all(RuntimeError("a decode step failed"))
                continue
            self.batches_run += 1
            self._rates.append((time.perf_counter(), self.batcher.tokens_generated))
        self.batcher.close()

    def _report(self, sequence: Sequence) -> None:
        """A request finished: its last text, then its outcome, once."""
        job = sequence.tag
        text = sequence.text
        if sequence.error is not None:
            job.emit("error", APIError(500, f"the model failed on this request ({type(sequence.error).__name__})"))
            self.finished(job)
            return
        visual, kept, patches = self._kept(sequence)
        first = sequence.first_token_at or sequence.finished_at
        usage = Usage(prompt_tokens=int(sequence.inputs["attention_mask"].sum()) if "attention_mask" in
                      sequence.inputs else sequence.prompt_tokens, completion_tokens=len(text.tokens),
                      visual_tokens=visual, visual_tokens_kept=kept,
                      prefill_time_s=max(0.0, first - (sequence.admitted_at or sequence.submitted_at)),
                      decode_time_s=max(0.0, sequence.finished_at - first),
                      queue_time_s=max(0.0, (sequence.admitted_at or sequence.submitted_at) - sequence.submitted_at),
                      batch_size=sequence.batch_size, prompt_cache_hit=sequence.prompt_cache_hit)
        job.emit("done", Outcome(text.text, text.finish_reason or "length", usage, patches, self.worker.grid))
        self.finished(job)

    def _kept(self, sequence: Sequence) -> tuple[int, int, list[list[int]]]:
        from ... import layout

        images = layout.prompt_images(self.worker.model, sequence.inputs, self.worker.adapter)[0]
        record = sequence.record
        if record is None or getattr(record, "kept_positions", None) is None:
            return self.worker._kept(images, None, 0)
        shift = record.keep_mask.shape[1] - sequence.prompt_tokens  # left padding of its prefill group
        own = record.kept_positions[sequence.record_row] - shift
        return self.worker._kept(images, _OneRow(own), 0)


class _OneRow:
    """A record's kept positions of one request, in its own prompt's coordinates (as worker._kept reads them)."""

    def __init__(self, positions: torch.Tensor):
        self.kept_positions = [positions]

