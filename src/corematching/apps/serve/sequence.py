"""A request inside the continuous batcher, and what admission needs to know about it: its inputs joined with
others' into one left-padded prefill batch, and the KV bytes its tokens take."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ...methods import Dense
from .stream_text import StreamText


class MemoryRefused(Exception):
    """A request whose KV cache could never fit the memory budget (the server answers 429)."""


@dataclass(eq=False)  # identity: a request equals only itself (its fields hold tensors)
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
    queued_step: int = 0  # the batcher's decode step count when it was submitted
    record: object = None  # the session's record of the prefill this request was part of
    record_row: int = 0
    error: BaseException | None = None
    cache_key: object = None  # the prompt cache's key for this prompt (None: neither looked up nor stored)
    prompt_cache_hit: bool = False  # joined from a stored prefill

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
