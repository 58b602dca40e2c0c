"""Iteration-level (continuous) batching: requests join the running decode batch at the step after their own
prefill and leave it the step they finish.

One decode step for the whole batch:
  1. requests that arrived are prefilled together (left-padded) and merged into the running batch
     (runtime/batching.py: each row keeps its own positions, pruned slots and core neurons);
  2. every row's next token is chosen on the device in one call (`choose_tokens`: greedy, or sampled with the
     row's temperature and top-p as tensors and the row's own seeded generator), and the tokens reach the host
     in one transfer for the whole batch;
  3. each row's text grows incrementally (`StreamText`: only a few tokens are decoded per step, stop sequences
     are searched in the new text only), and its new text is handed out for streaming;
  4. rows that finished (end token, length, stop sequence, client gone) leave; the others run one forward.

Requests run under their method's sparsify session, and the model holds one session at a time: requests of one
method (its settings included) share decode steps; requests of another wait until the running batch drains.
Admission is first come, first served across methods (a request of the running method that arrived after a
waiting request of another method waits too), so no setting starves. Admission is also by memory: each row
reserves the KV bytes of its prompt (after the prefill: of the slots its layers really hold, the kept tokens
after the prune layer) plus those of its `max_tokens` new tokens, and the session's sliced FFN weights are
counted; a request that could never fit is refused (`MemoryRefused`), one that does not fit now waits.
`static=True` runs the same loop as static batching (a batch is admitted only when the previous one has fully
finished, and finished rows keep computing until the longest ends): the baseline of benchmarks/bench_serve.py.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque

import torch

from ...methods import Dense
from ...runtime import DecodeBatch, kv_bytes, merge_batches, prefill_batch, sparsify
from ...runtime.batching import row_kv_bytes
from .choose import choose_tokens, new_generator
from .prompt_cache import PrefillEntry, PromptCache
from .sequence import MemoryRefused, Sequence, combine_inputs, kv_bytes_per_token
from .stream_text import StreamText


class ContinuousBatcher:
    """Runs requests with iteration-level batching on one model (not thread-safe except `submit`, `cancel` and
    `metrics`: one thread calls `step`)."""

    def __init__(self, model, max_batch: int = 16, kv_budget_bytes: int | None = None, pad_id: int = 0,
                 static: bool = False, join_wait_steps: int = 0, prompt_cache: PromptCache | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if join_wait_steps < 0:
            raise ValueError(f"join_wait_steps must be >= 0, got {join_wait_steps}")
        self.model = model
        self.max_batch = max_batch
        self.kv_budget_bytes = kv_budget_bytes
        self.pad_id = pad_id
        self.static = static
        # While a batch runs, arrivals may wait up to this many decode steps for others (and for rows to finish),
        # so that they are prefilled together: one prefill pauses the batch instead of several. 0: each step
        # admits what waits and fits.
        self.join_wait_steps = join_wait_steps
        self.layers = model.config.get_text_config().num_hidden_layers
        self.token_bytes = kv_bytes_per_token(model) * self.layers  # one token in every layer
        self.device = next(model.parameters()).device
        self._waiting: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self._running: DecodeBatch | None = None
        self._rows: list[Sequence] = []  # request of each running row
        self._logits: torch.Tensor | None = None  # [B, V] next-token logits of the running rows
        self._generators: list = []  # per running row
        self._temperature: torch.Tensor | None = None
        self._top_p: torch.Tensor | None = None
        self._session = None
        self._session_key: str | None = None
        # Prompt cache: a single request's prefill is stored under its Sequence.cache_key, and a later request
        # with the same key joins from a copy of it without a prefill (entries belong to one session).
        self.prompt_cache = prompt_cache
        self._cache_session = ("continuous", 0)
        # counters for /metrics
        self.tokens_generated = 0
        self.requests_finished = 0
        self.steps = 0
        self.prefills = 0

    # -------------------------------------------------------------------------------------------- requests

    def reservation(self, sequence: Sequence) -> int:
        """KV bytes a request may take before its prefill: every prompt token and new token in every layer."""
        return (sequence.prompt_tokens + sequence.max_tokens) * self.token_bytes

    def submit(self, sequence: Sequence) -> None:
        need = self.reservation(sequence)
        if self.kv_budget_bytes is not None and need > self.kv_budget_bytes:
            raise MemoryRefused(
                f"this request needs up to {need} bytes of KV cache ({sequence.prompt_tokens} prompt tokens + "
                f"{sequence.max_tokens} new tokens), more than the server's budget of {self.kv_budget_bytes} "
                "bytes; send a shorter prompt or a smaller max_tokens"
            )
        sequence.submitted_at = sequence.submitted_at or time.perf_counter()
        if sequence.tokenizer is None:
            raise ValueError("a Sequence needs the tokenizer that decodes its tokens")
        sequence.text = StreamText(sequence.tokenizer, sequence.max_tokens, sequence.stop, sequence.eos_ids)
        with self._lock:
            sequence.queued_step = self.steps
            self._waiting.append(sequence)

    def cancel(self, sequence: Sequence) -> None:
        """The client went away: the request stops at the next step (a waiting one never starts)."""
        sequence.cancelled.set()

    @property
    def idle(self) -> bool:
        return not self._rows and not self._waiting

    def metrics(self) -> dict:
        running = self._running
        return {
            "queue_length": len(self._waiting),
            "batch_size": len(self._rows),
            "kv_bytes": kv_bytes(running) if running is not None else 0,
            "kv_reserved_bytes": sum(s.reserved_bytes for s in list(self._rows)),
            "sliced_weight_bytes": self._sliced_bytes(),
            "tokens_generated_total": self.tokens_generated,
            "requests_finished_total": self.requests_finished,
            "decode_steps_total": self.steps,
            "prefills_total": self.prefills,
        }

    # -------------------------------------------------------------------------------------------- the loop

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration: admit and prefill arrivals, choose every row's next token, stream, let finished rows
        leave, run one decode forward. Returns whether there was anything to do."""
        self._drop_cancelled_waiting()
        arrivals = self._admit()
        if arrivals:
            self._prefill(arrivals)
        if not self._rows:
            return bool(arrivals)
        tokens = choose_tokens(self._logits, self._temperature, self._top_p, self._generators)
        chosen = tokens.tolist()  # the one transfer of the step
        now = time.perf_counter()
        staying = []
        for row, (sequence, token) in enumerate(zip(self._rows, chosen)):
            text = sequence.text
            if sequence.cancelled.is_set():
                text.cancel()
            if not text.finished:
                if sequence.first_token_at is None:
                    sequence.first_token_at = now
                piece = text.add(token)
                self.tokens_generated += 1
                if piece and sequence.on_text is not None:
                    sequence.on_text(piece)
            if self.static:
                staying.append(row)  # a static batch runs every row until its longest ends
            elif text.finished:
                self._finish(sequence)
            else:
                staying.append(row)
        if self.static and all(sequence.text.finished for sequence in self._rows):
            for sequence in self._rows:  # the batch's one generate call returns: every request is answered
                self._finish(sequence)
            staying = []
        if not staying:
            self._clear()
            return True
        if len(staying) < len(self._rows):
            self._keep_rows(staying)
            tokens = tokens[torch.tensor(staying, device=tokens.device)]
        self._logits = self._running.step(self.model, tokens)
        self.steps += 1
        return True

    def run_until_idle(self) -> None:
        while self.step() or not self.idle:
            pass

    def close(self) -> None:
        """Finish what runs (as cancelled) and detach the session."""
        for sequence in list(self._rows) + list(self._waiting):
            sequence.text.cancel()
            self._finish(sequence)
        self._waiting.clear()
        self._clear()
        if self._session is not None:
            self._session.remove()
            self._session, self._session_key = None, None

    def fail_all(self, error: BaseException) -> None:
        """Every request in flight ends with `error` (its own, if it already had one); each is reported once."""
        failed = list(self._rows) + list(self._waiting)
        self._waiting.clear()
        self._clear()
        for sequence in failed:
            sequence.error = sequence.error or error
            sequence.text.cancel()
            self._finish(sequence)

    # -------------------------------------------------------------------------------------------- admission

    def _drop_cancelled_waiting(self) -> None:
        with self._lock:
            gone = [s for s in self._waiting if s.cancelled.is_set()]
            for sequence in gone:
                self._waiting.remove(sequence)
        for sequence in gone:
            sequence.text.cancel()
            self._finish(sequence)

    def _admit(self) -> list[Sequence]:
        """Waiting requests that join now: of the running method (any, when nothing runs), in arrival order up to
        the first waiting request of another method, within the row and memory limits."""
        if self.static and self._rows:
            return []
        with self._lock:
            if not self._waiting:
                return []
            key = self._rows[0].key if self._rows else self._waiting[0].key
            room = self.max_batch - len(self._rows)
            if self._rows and len(self._waiting) < self.max_batch and \
                    self.steps - self._waiting[0].queued_step < self.join_wait_steps:
                return []  # the batch runs on; rows may finish and more arrivals come to share the prefill
            budget = None
            if self.kv_budget_bytes is not None:
                budget = self.kv_budget_bytes - sum(s.reserved_bytes for s in self._rows) - self._sliced_bytes()
            arrivals = []
            for sequence in self._waiting:
                if sequence.key != key or len(arrivals) >= room:
                    break
                need = self.reservation(sequence)
                if budget is not None:
                    if need > budget:
                        break
                    budget -= need
                arrivals.append(sequence)
            for sequence in arrivals:
                self._waiting.popleft()
                sequence.reserved_bytes = self.reservation(sequence)
        return arrivals

    def _prefill(self, arrivals: list[Sequence]) -> None:
        """Arrivals join the running batch: those whose prompt the prompt cache holds from a copy of its stored
        prefill, the others through one prefill together."""
        started = time.perf_counter()
        for sequence in arrivals:
            sequence.admitted_at = sequence.admitted_at or started
        self._use_method(arrivals[0].method)
        parts, misses = [], []
        for sequence in arrivals:
            entry = None
            if self.prompt_cache is not None and sequence.cache_key is not None:
                entry = self.prompt_cache.get(sequence.cache_key, self._cache_session)
            if entry is None:
                misses.append(sequence)
            else:  # a private copy of the stored prefill; the entry stays as it was for the next hit
                sequence.record, sequence.record_row, sequence.prompt_cache_hit = entry.record, 0, True
                parts.append(([sequence], copy.deepcopy(entry.cache), entry.first_logits[None].clone()))
        if misses:
            parts += self._prefill_together(misses)
        for sequences, batch, logits in parts:
            self._join(sequences, batch, logits)

    def _prefill_together(self, arrivals: list[Sequence]) -> list[tuple]:
        """One left-padded prefill of the arrivals: [(arrivals, their batch, first-token logits [B, V])]. When
        it fails, each is tried alone, so that one bad request does not take the others with it."""
        inputs = combine_inputs([s.inputs for s in arrivals], self.pad_id)
        try:
            joined, logits = prefill_batch(self.model, inputs, pad_token_id=self.pad_id)
        except Exception as error:
            if len(arrivals) == 1:
                arrivals[0].error = error
                arrivals[0].text.cancel()
                self._finish(arrivals[0])
                return []
            return [part for sequence in arrivals for part in self._prefill_together([sequence])]
        self.prefills += 1
        record = self._session.last if self._session is not None else None
        for row, sequence in enumerate(arrivals):
            sequence.record, sequence.record_row = record, row
        only = arrivals[0]
        if len(arrivals) == 1 and self.prompt_cache is not None and only.cache_key is not None:
            held = self._session.held_bytes_of(joined.cache) if self._session is not None else 0
            self.prompt_cache.put(only.cache_key, PrefillEntry(
                copy.deepcopy(joined), logits[0].clone(), only.inputs["input_ids"].clone(), 0, 0, [],
                self._cache_session, held_bytes=held, record=record))
        return [(arrivals, joined, logits)]

    def _join(self, arrivals: list[Sequence], joined: DecodeBatch, logits: torch.Tensor) -> None:
        """Rows of a new batch (prefilled, or copied from the prompt cache) join the running one."""
        held = row_kv_bytes(joined)  # per row: the slots its layers really hold
        for row, sequence in enumerate(arrivals):
            sequence.batch_size = len(self._rows) + len(arrivals)
            sequence.reserved_bytes = held[row] + sequence.max_tokens * self.token_bytes
        generators = [None if s.temperature <= 0 else new_generator(
            s.seed if s.seed is not None else int(torch.randint(0, 2**62, ())), logits.device) for s in arrivals]
        temperature = torch.tensor([s.temperature for s in arrivals], device=logits.device)
        top_p = torch.tensor([s.top_p for s in arrivals], device=logits.device)
        if self._running is None:
            self._running, self._logits = joined, logits
            self._temperature, self._top_p, self._generators = temperature, top_p, generators
        else:
            self._running = merge_batches([self._running, joined])
            self._logits = torch.cat([self._logits, logits])
            self._temperature = torch.cat([self._temperature, temperature])
            self._top_p = torch.cat([self._top_p, top_p])
            self._generators = self._generators + generators
        self._rows = self._rows + arrivals

    def _keep_rows(self, staying: list[int]) -> None:
        self._running.select(staying)
        index = torch.tensor(staying, device=self._logits.device)
        self._rows = [self._rows[row] for row in staying]
        self._generators = [self._generators[row] for row in staying]
        self._temperature = self._temperature.index_select(0, index)
        self._top_p = self._top_p.index_select(0, index)

    def _clear(self) -> None:
        self._running, self._rows, self._logits, self._generators = None, [], None, []
        self._temperature = self._top_p = None

    def _finish(self, sequence: Sequence) -> None:
        if sequence.finished_at is not None:
            return  # reported once
        sequence.finished_at = time.perf_counter()
        sequence.reserved_bytes = 0
        self.requests_finished += 1
        if sequence.on_done is not None:
            sequence.on_done(sequence)

    def _use_method(self, method) -> None:
        key = "dense" if method is None or isinstance(method, Dense) else repr(method)
        if key == self._session_key:
            return
        if self._session is not None:
            self._session.remove()
            self._session = None
        if self.prompt_cache is not None:  # stored prefills carry the old session's decisions
            self.prompt_cache.drop_session(self._cache_session)
        if key != "dense":
            self._session = sparsify(self.model, method)
        self._session_key = key
        self._cache_session = ("continuous", self._cache_session[1] + 1)

    def _sliced_bytes(self) -> int:
        """Memory of the sliced FFN weights the session holds for the core-neuron decoding of live caches."""
        return 0 if self._session is None else self._session.held_bytes

