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

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..methods import Dense
from ..runtime import DecodeBatch, kv_bytes, merge_batches, prefill_batch, sparsify
from ..runtime.batching import row_kv_bytes

# ------------------------------------------------------------------------------------------------ tokens


def new_generator(seed: int, device) -> torch.Generator:
    """A request's own sampling generator, on the device its logits live on."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed % 2**63)
    return generator


def choose_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generators: list
) -> torch.Tensor:
    """The next token of every row, on the device: logits [B, V]; temperature [B] (0: greedy); top_p [B] in
    (0, 1]; generators: per row its torch.Generator (None for a greedy row).

    A sampled row draws one uniform number from its own generator and inverts the cumulative distribution of its
    own top-p-truncated softmax, so its token does not depend on its batch mates: the same seed gives the same
    tokens alone or batched. Nothing is copied to the host."""
    greedy = logits.argmax(-1)
    sampled_rows = [row for row, generator in enumerate(generators) if generator is not None]
    if not sampled_rows:
        return greedy
    device = logits.device
    draws = torch.stack([torch.rand((), generator=generators[row], device=device) for row in sampled_rows])
    uniform = torch.zeros(logits.shape[0], device=device)
    uniform[torch.tensor(sampled_rows, device=device)] = draws
    scaled = logits.float() / temperature.to(device).clamp(min=1e-6).unsqueeze(1)
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = sorted_probs.masked_fill(before >= top_p.to(device).unsqueeze(1), 0.0)  # the top-p prefix
    cumulative = sorted_probs.cumsum(-1)
    target = (uniform * cumulative[:, -1]).unsqueeze(1)
    pick = torch.searchsorted(cumulative, target, right=True).clamp(max=logits.shape[1] - 1)
    sampled = order.gather(1, pick).squeeze(1)
    return torch.where(temperature.to(device) > 0, sampled, greedy)


class StreamText:
    """One request's generated tokens and text, grown incrementally.

    Each new token decodes only a short window (the tokens since the last complete character boundary and the
    ones before it, for the spacing rules of the tokenizer), so a step costs the same at token 5 and token 500.
    Stop sequences are searched in the new text and the few characters before it; text that may be the start of
    a stop sequence, or an unfinished character, is held back from the stream until it is settled."""

    def __init__(self, tokenizer, max_tokens: int, stop: list[str], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.eos_ids = eos_ids
        self.tokens: list[int] = []
        self.text = ""  # settled text so far (the final text once finished, a stop sequence cut off)
        self.sent = 0  # characters of the text already handed out
        self.finish_reason: str | None = None
        self.finished_at: float | None = None
        self._window = 0  # first token of the decoded window
        self._settled = 0  # tokens whose text is in self.text
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Take one generated token; return the new text that can be sent now (maybe empty)."""
        if self.finish_reason is not None:
            return ""
        if token in self.eos_ids:
            return self._finish("stop", self.text + self._pending())
        self.tokens.append(token)
        before = self._decode(self._window, self._settled)
        now = self._decode(self._window, len(self.tokens))
        if len(now) > len(before) and not now.endswith("\ufffd"):
            searched_from = max(0, len(self.text) - self._longest_stop + 1)
            self.text += now[len(before):]
            self._window, self._settled = self._settled, len(self.tokens)
            cut = self._first_stop(searched_from)
            if cut is not None:
                return self._finish("stop", self.text[:cut])
        if len(self.tokens) >= self.max_tokens:
            return self._finish("length", self.text + self._pending())
        ready = len(self.text)
        for stop in self.stop:  # hold back what may be the start of a stop sequence
            for size in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:size]):
                    ready = min(ready, len(self.text) - size)
                    break
        return self._take(ready)

    def end_at_limit(self) -> str:
        """Decoding stopped without this request finishing on its own: it ends at its length limit."""
        return self._finish("length", self.text + self._pending()) if self.finish_reason is None else ""

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            self.finished_at = time.perf_counter()

    def _decode(self, start: int, end: int) -> str:
        if end <= start:
            return ""
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True)

    def _pending(self) -> str:
        """Text of the tokens not settled yet (an unfinished character)."""
        if self._settled == len(self.tokens):
            return ""
        return self._decode(self._window, len(self.tokens))[len(self._decode(self._window, self._settled)):]

    def _first_stop(self, start: int) -> int | None:
        cuts = [cut for cut in (self.text.find(stop, start) for stop in self.stop) if cut >= 0]
        return min(cuts) if cuts else None

    def _finish(self, reason: str, text: str) -> str:
        self.finish_reason = reason
        self.finished_at = time.perf_counter()
        self.text = text
        return self._take(len(text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self.text[self.sent : upto]
        self.sent = upto
        return piece


# ------------------------------------------------------------------------------------------------ requests


class MemoryRefused(Exception):
    """A request whose KV cache could never fit the memory budget (the server answers 429)."""


@dataclass
class Sequence:
    """One request inside the batcher."""

    inputs: dict  # the processor's output for this prompt alone (batch of 1)
    max_tokens: int
    method: object = None  # a corematching method (None or cm.Dense(): the plain model)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_ids: set[int] = field(default_factory=set)
    on_text: object = None  # callable(str): new text for the stream
    on_done: object = None  # callable(Sequence): called once, when the request finished (or was cancelled)
    tokenizer: object = None  # decodes the generated tokens (the processor's tokenizer)
    tag: object = None  # the caller's own (a job)
    submitted_at: float = 0.0
    admitted_at: float | None = None  # when its prefill started
    batch_size: int = 0  # rows of the batch when it joined
    first_token_at: float | None = None
    finished_at: float | None = None
    text: StreamText | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    reserved_bytes: int = 0  # KV bytes the request holds in the admission count
    record: object = None  # the session's record of the prefill this request was part of
    record_row: int = 0
    error: BaseException | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def key(self) -> str:
        return "dense" if self.method is None or isinstance(self.method, Dense) else repr(self.method)


def combine_inputs(inputs: list[dict], pad_id: int) -> dict:
    """Several prompts' processor outputs (each a batch of 1) as one left-padded batch: per-token tensors
    (input_ids, attention_mask, mm_token_type_ids, ...) padded on the left, per-image tensors concatenated."""
    if len(inputs) == 1:
        return inputs[0]
    width = max(int(one["input_ids"].shape[1]) for one in inputs)
    combined = {}
    names = list(dict.fromkeys(name for one in inputs for name in one))  # every input's, in first-seen order
    for name in names:
        values = [one.get(name) for one in inputs]
        if any(value is None for value in values):
            if all(value is None for value in values):
                continue
            values = [value for value in values if value is not None]
            combined[name] = torch.cat(values)
            continue
        per_token = all(v.dim() == 2 and v.shape[1] == one["input_ids"].shape[1] for v, one in zip(values, inputs))
        if per_token and name != "pixel_values":
            fill = pad_id if name == "input_ids" else 0
            combined[name] = torch.cat([
                torch.cat([torch.full((1, width - v.shape[1]), fill, dtype=v.dtype, device=v.device), v], dim=1)
                for v in values
            ])
        else:
            combined[name] = torch.cat(values)
    if "attention_mask" not in inputs[0]:
        combined["attention_mask"] = torch.cat([
            torch.cat([torch.zeros(1, width - one["input_ids"].shape[1], dtype=torch.long),
                       torch.ones(1, one["input_ids"].shape[1], dtype=torch.long)], dim=1) for one in inputs
        ]).to(inputs[0]["input_ids"].device)
    return combined


def kv_bytes_per_token(model) -> int:
    """KV bytes one token takes in one decoder layer (keys and values)."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = next(model.parameters()).dtype
    return 2 * heads * head_dim * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------ the batcher


class ContinuousBatcher:
    """Runs requests with iteration-level batching on one model (not thread-safe except `submit`, `cancel` and
    `metrics`: one thread calls `step`)."""

    def __init__(self, model, max_batch: int = 16, kv_budget_bytes: int | None = None, pad_id: int = 0,
                 static: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.kv_budget_bytes = kv_budget_bytes
        self.pad_id = pad_id
        self.static = static
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
        started = time.perf_counter()
        for sequence in arrivals:
            sequence.admitted_at = sequence.admitted_at or started
        self._use_method(arrivals[0].method)
        inputs = combine_inputs([s.inputs for s in arrivals], self.pad_id)
        try:
            joined, logits = prefill_batch(self.model, inputs, pad_token_id=self.pad_id)
        except Exception as error:  # one bad request must not take the others with it: retry one by one
            if len(arrivals) == 1:
                arrivals[0].error = error
                arrivals[0].text.cancel()
                self._finish(arrivals[0])
                return
            for sequence in arrivals:
                self._prefill([sequence])
            return
        self.prefills += 1
        record = self._session.last if self._session is not None else None
        held = row_kv_bytes(joined)  # per row: the slots its layers really hold
        for row, sequence in enumerate(arrivals):
            sequence.record, sequence.record_row = record, row
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
        if key != "dense":
            self._session = sparsify(self.model, method)
        self._session_key = key

    def _sliced_bytes(self) -> int:
        """Memory of the sliced FFN weights the session holds for the core-neuron decoding of live caches."""
        return 0 if self._session is None else self._session.held_bytes


def percentile(values: list[float], share: float) -> float:
    """Linear-interpolated percentile of values (share in [0, 1]); nan for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = share * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# ------------------------------------------------------------------------------------------------ the server's


class ContinuousScheduler:
    """The server's scheduler with iteration-level batching (`corematching serve --batching continuous`): the
    interface of scheduler.Scheduler (submit, cancel, finished, pending, close), one thread running the
    ContinuousBatcher's steps. A request that could never fit the KV budget, or one more than `max_pending`
    unfinished ones, gets 429; a client that goes away cancels its request at the next step (its text so far is
    not sent again, and it is reported once)."""

    def __init__(self, worker, max_batch_size: int, max_pending: int, kv_budget_bytes: int | None = None):
        if max_batch_size < 1 or max_pending < 1:
            raise ValueError("max_batch_size and max_pending must be >= 1")
        self.worker = worker
        self.batcher = ContinuousBatcher(worker.model, max_batch_size, kv_budget_bytes, worker.pad_id)
        self.max_pending = max_pending
        self._sequences: dict = {}  # job -> its Sequence, until it is reported
        self._lock = threading.Condition()
        self._closing = False
        self._rates: deque = deque(maxlen=64)  # (time, tokens generated so far) after recent steps
        self.batches_run = 0  # decode steps run
        self._thread = threading.Thread(target=self._loop, name="corematching-continuous", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------------------------------- HTTP side

    def submit(self, job) -> None:
        from .errors import APIError

        request = job.request
        with self._lock:
            if self._closing:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._sequences) >= self.max_pending:
                raise APIError(429, f"the server is busy: {self.max_pending} requests are already queued or "
                               "running; retry later", code="queue_full")
            sequence = Sequence(
                inputs=self.worker.batch_inputs([job]), max_tokens=request.max_tokens, method=request.method,
                temperature=request.temperature, top_p=request.top_p, seed=request.seed, stop=list(request.stop),
                eos_ids=set() if getattr(request, "ignore_eos", False) else set(self.worker.eos_ids),
                tokenizer=self.worker.tokenizer, tag=job, submitted_at=job.enqueued_at,
                on_text=lambda piece: job.emit("text", piece), on_done=self._report)
            try:
                self.batcher.submit(sequence)
            except MemoryRefused as error:
                raise APIError(429, str(error), code="kv_cache_full") from None
            self._sequences[job] = sequence
            self._lock.notify_all()

    def cancel(self, job) -> None:
        job.cancel()
        with self._lock:
            sequence = self._sequences.get(job)
            if sequence is not None:
                self.batcher.cancel(sequence)
            self._lock.notify_all()

    def finished(self, job) -> None:
        with self._lock:
            self._sequences.pop(job, None)
            self._lock.notify_all()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._sequences)

    def close(self, timeout_s: float = 60.0) -> bool:
        """Let the accepted requests finish (up to timeout_s), then stop; True when all finished."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            while self._sequences and time.monotonic() < deadline:
                self._lock.wait(0.1)
            drained = not self._sequences
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        return drained

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
        import logging

        log = logging.getLogger("corematching.serve")
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
                self._fail_all()
                continue
            self.batches_run += 1
            self._rates.append((time.perf_counter(), self.batcher.tokens_generated))
        self.batcher.close()

    def _fail_all(self) -> None:
        """Every request in flight ends with an error (reported once, by _report)."""
        batcher = self.batcher
        failed = list(batcher._rows) + list(batcher._waiting)
        batcher._waiting.clear()
        batcher._clear()
        for sequence in failed:
            sequence.error = sequence.error or RuntimeError("a decode step failed")
            sequence.text.cancel()
            batcher._finish(sequence)

    def _report(self, sequence: Sequence) -> None:
        """A request finished: its last text, then its outcome, once."""
        from .errors import APIError
        from .jobs import Outcome, Usage

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
                      batch_size=sequence.batch_size)
        job.emit("done", Outcome(text.text, text.finish_reason or "length", usage, patches, self.worker.grid))
        self.finished(job)

    def _kept(self, sequence: Sequence) -> tuple[int, int, list[list[int]]]:
        from .. import layout

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


def metrics_text(scheduler) -> str:
    """The scheduler's numbers in the Prometheus text format (version 0.0.4)."""
    values = scheduler.metrics() if hasattr(scheduler, "metrics") else {"unfinished_requests": scheduler.pending}
    lines = []
    for name, value in values.items():
        help_text, kind = METRICS.get(name, (name.replace("_", " "), "gauge"))
        metric = f"corematching_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}", f"{metric} {float(value):g}"]
    return "\n".join(lines) + "\n"


METRICS = {
    "queue_length": ("Requests waiting to join the decode batch.", "gauge"),
    "batch_size": ("Requests in the running decode batch.", "gauge"),
    "kv_bytes": ("Bytes of the running batch's KV cache (padding slots included).", "gauge"),
    "kv_reserved_bytes": ("KV bytes reserved by the running requests (kept tokens and max_tokens).", "gauge"),
    "sliced_weight_bytes": ("Bytes of sliced FFN weights held for core-neuron decoding.", "gauge"),
    "tokens_generated_total": ("Tokens generated since the server started.", "counter"),
    "requests_finished_total": ("Requests finished (answered, stopped or cancelled).", "counter"),
    "decode_steps_total": ("Decode steps run.", "counter"),
    "prefills_total": ("Prefill calls run (each for the requests that arrived together).", "counter"),
    "unfinished_requests": ("Requests accepted and not yet finished.", "gauge"),
    "tokens_per_second": ("Tokens generated per second over the recent decode steps.", "gauge"),
}
