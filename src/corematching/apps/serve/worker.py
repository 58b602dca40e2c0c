"""The model worker: runs one batch of jobs (one sparsity setting) through `generate` and reports each job.

It owns the model. One session stays attached while consecutive batches share a sparsity setting and is
replaced when the setting changes (a model holds one session at a time). Each batch is one plain
`model.generate` call; per-request sampling, token limits, stop sequences, streaming and client disconnects
are handled per row by a logits processor (`sampling.BatchChooser`) and a stopping criterion
(`decoding.BatchFollower`). With the prompt cache on, a request whose images and prompt were prefilled before
under the same session decodes from a copy of that prefill's KV cache.
"""

from __future__ import annotations

import copy
import logging
import threading
import time

import torch
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteriaList

import corematching as cm

from ... import layout
from ...models import adapter_for
from .collate import collate
from .decoding import BatchFollower
from .errors import APIError, bad_request
from .jobs import Job, Outcome, Usage
from .prompt_cache import PrefillEntry, PromptCache, continued_copy, prompt_key
from .sampling import BatchChooser, RequestSampler
from .stream_text import StreamText

log = logging.getLogger("corematching.apps.serve")


class ModelWorker:
    def __init__(self, model, processor, prompt_cache: PromptCache | None = None, on_finished=None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt_cache = prompt_cache
        self.on_finished = on_finished or (lambda job: None)
        self.processor_lock = threading.Lock()  # tokenizers are not safe to share between threads
        self.adapter = adapter_for(model)
        self.grid = self.adapter.image_grid  # every image's token grid where all share one (the page's overlay)
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(i) for i in eos if i is not None}
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        pad = model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.pad_token_id or min(self.eos_ids))
        # Every row stops on its own (its end token unless it ignores it, its limit, its stop sequences), so
        # generate gets no end token: it stops when the follower says all rows are done.
        self._session = None
        self._session_key = None
        self.session_id = 0

    # ------------------------------------------------------------------------------------------ prompts

    def prompt_text(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, prompts: list[str], images: list[list]) -> dict:
        """The processor's output (on the CPU): token ids, attention mask, pixel values, ...
        images: each prompt's images (processors that batch prompts, as Gemma 3's, ask for them per prompt)."""
        with self.processor_lock:
            return dict(self.processor(images=images if any(images) else None, text=prompts, padding=True,
                                       return_tensors="pt"))

    def encode_request(self, prompt: str, images: list) -> dict:
        """One request's encoding, made once when it arrives; its length is the prompt's token count (each image's
        tokens included)."""
        try:
            return self.encode([prompt], [images])
        except (ValueError, TypeError) as error:  # e.g. image placeholders and images that do not match
            raise bad_request(f"the prompt cannot be encoded: {error}", param="messages") from None

    def batch_inputs(self, jobs: list[Job]) -> dict:
        """The model inputs of a batch, on the model's device: the jobs' own encodings, padded together."""
        inputs = collate([job.inputs for job in jobs], self.pad_id, getattr(self.tokenizer, "padding_side", "left"))
        if inputs is None:  # a processor that pads more than token rows: let it encode the batch
            inputs = self.encode([job.prompt for job in jobs],
                                 [[image.image for image in job.request.images] for job in jobs])
        inputs = {name: value.to(self.model.device) for name, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    # ------------------------------------------------------------------------------------------ sessions

    def _use_method(self, method) -> None:
        key = repr(method)
        if key == self._session_key:
            return
        self.close()
        if not isinstance(method, cm.Dense):
            self._session = cm.sparsify(self.model, method)
        self._session_key = key
        self.session_id += 1

    def close(self) -> None:
        if self._session is not None:
            self._session.remove()
            self._session = None
        if self.prompt_cache is not None:
            self.prompt_cache.drop_session(self.session_id)
        self._session_key = None

    # ------------------------------------------------------------------------------------------ batches

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if not job.cancelled.is_set()]
        for job in jobs:
            if job.cancelled.is_set():
                self._finish(job, Outcome("", "cancelled", Usage(prompt_tokens=job.prompt_tokens)))
        if not live:
            return
        self._use_method(live[0].request.method)
        rest = []
        for job in live:
            entry = None
            if self.prompt_cache is not None and job.request.images:
                entry = self.prompt_cache.get(prompt_key(job), self.session_id)
            if entry is not None:
                self._run_from_cache(job, entry)
            else:
                rest.append(job)
        if len(rest) == 1:
            self._run_batch(rest)
        elif rest:
            self._run_batch_or_each(rest)

    def _run_batch_or_each(self, jobs: list[Job]) -> None:
        """A batch that fails before any of its jobs was answered runs again one job at a time, so that one bad
        request fails alone instead of taking its batch mates with it."""
        try:
            self._run_batch(jobs)
            return
        except Exception:
            if any(job.emitted for job in jobs):
                raise
        for job in jobs:
            try:
                self._run_batch([job])
            except Exception as error:
                log.exception("a request failed")
                job.emit("error", APIError(500, f"the model failed on this request ({type(error).__name__})"))
                self.on_finished(job)

    def _texts_and_samplers(self, jobs):
        texts = [StreamText(self.tokenizer, job.request.max_tokens, job.request.stop,
                             set() if job.request.ignore_eos else self.eos_ids) for job in jobs]
        samplers = [RequestSampler(job.request.temperature, job.request.top_p, job.request.seed) for job in jobs]
        follower = BatchFollower(texts, on_text=lambda row, piece: jobs[row].emit("text", piece),
                                 is_cancelled=lambda row: jobs[row].cancelled.is_set())
        return texts, samplers, follower

    def _run_batch(self, jobs: list[Job]) -> None:
        started = time.perf_counter()
        inputs = self.batch_inputs(jobs)
        texts, samplers, follower = self._texts_and_samplers(jobs)
        cache = DynamicCache(config=self.model.config.get_text_config())
        snapshot = {}
        store = self.prompt_cache is not None and len(jobs) == 1 and bool(jobs[0].request.images)
        if store:
            def keep_prefill(scores):  # right after the prefill, before the cache takes the first new token
                snapshot["cache"] = copy.deepcopy(cache)
                snapshot["logits"] = scores[0].clone()
        chooser = BatchChooser(samplers, on_prefill_done=keep_prefill if store else None)
        self.model.generate(
            **inputs,
            cache=cache,
            max_new_tokens=max(job.request.max_tokens for job in jobs),
            do_sample=False,
            logits_processor=LogitsProcessorList([chooser]),
            stopping_criteria=StoppingCriteriaList([follower]),
            pad_token_id=self.pad_id,
            eos_token_id=None,  # every row stops on its own (see __init__)
        )
        record = self._session.last if self._session is not None else None
        prefill_done = chooser.prefill_done_at or time.perf_counter()
        images_of_rows = layout.prompt_images(self.model, inputs, self.adapter)
        for row, job in enumerate(jobs):
            visual, kept, patches = self._kept(images_of_rows[row], record, row)
            if store and "cache" in snapshot:
                held = self._session.held_bytes_of(snapshot["cache"]) if self._session is not None else 0
                self.prompt_cache.put(prompt_key(job), PrefillEntry(
                    snapshot["cache"], snapshot["logits"], inputs["input_ids"][:1].clone(), visual, kept, patches,
                    self.session_id, held_bytes=held))
            usage = Usage(prompt_tokens=int(inputs["attention_mask"][row].sum()), visual_tokens=visual,
                          visual_tokens_kept=kept, prefill_time_s=prefill_done - started,
                          queue_time_s=started - job.enqueued_at, batch_size=len(jobs))
            self._complete(job, texts[row], usage, prefill_done, patches)

    def _run_from_cache(self, job: Job, entry: PrefillEntry) -> None:
        started = time.perf_counter()
        texts, samplers, follower = self._texts_and_samplers([job])
        cache = continued_copy(entry)
        first = samplers[0].choose(entry.first_logits)
        prefill_done = time.perf_counter()
        follower.feed(0, first)
        if texts[0].finish_reason is None:
            chooser = BatchChooser(samplers)
            chooser.prefill_done_at = prefill_done
            input_ids = torch.cat([entry.input_ids, torch.tensor([[first]], device=entry.input_ids.device)], dim=1)
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                cache=cache,
                max_new_tokens=job.request.max_tokens - 1,
                do_sample=False,
                logits_processor=LogitsProcessorList([chooser]),
                stopping_criteria=StoppingCriteriaList([follower]),
                pad_token_id=self.pad_id,
                eos_token_id=None,
            )
        usage = Usage(prompt_tokens=int(entry.input_ids.shape[1]), visual_tokens=entry.visual_tokens,
                      visual_tokens_kept=entry.visual_tokens_kept, prefill_time_s=prefill_done - started,
                      queue_time_s=started - job.enqueued_at, batch_size=1, prompt_cache_hit=True)
        self._complete(job, texts[0], usage, prefill_done, entry.kept_patches)

    # ------------------------------------------------------------------------------------------ reporting

    def _complete(self, job: Job, text: StreamText, usage: Usage, prefill_done: float, patches) -> None:
        piece = text.end_at_limit()  # when generate stopped before the request finished on its own
        if piece:
            job.emit("text", piece)
        usage.completion_tokens = len(text.tokens)
        usage.decode_time_s = max(0.0, (text.finished_at or time.perf_counter()) - prefill_done)
        self._finish(job, Outcome(text.text, text.finish_reason, usage, patches, self.grid))

    def _finish(self, job: Job, outcome: Outcome) -> None:
        job.emit("done", outcome)
        self.on_finished(job)

    def _kept(self, images: list, record, row: int) -> tuple[int, int, list[list[int]]]:
        """Visual tokens of a row, how many were kept, and per image the indices (in token order over the image's
        visual tokens, row-major on its grid) of the kept ones; the images as layout.prompt_images gives them."""
        visual = sum(int(image.positions.numel()) for image in images)
        if record is None or record.kept_positions is None:
            patches = [list(range(image.positions.numel())) for image in images]
        else:
            patches = [layout.kept_in(image.positions, record.kept_positions[row]) for image in images]
        return visual, sum(len(kept) for kept in patches), patches
