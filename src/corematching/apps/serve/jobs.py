"""One accepted request on its way through the server: what it asks, and how its events reach the client.

The model runs in a worker thread; the HTTP side awaits the job's events on its event loop. `emit` is the
only bridge: it is safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field

from .methods import method_key
from .protocol import ChatRequest

_ids = itertools.count(1)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    visual_tokens: int = 0  # visual tokens in the prompt
    visual_tokens_kept: int = 0  # of those, the ones that went on past the prune layer
    prefill_time_s: float = 0.0  # of the batch the request ran in (or 0 on a prompt-cache hit)
    decode_time_s: float = 0.0  # from the end of the prefill to this request's last token
    queue_time_s: float = 0.0
    batch_size: int = 1
    prompt_cache_hit: bool = False

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "visual_tokens": self.visual_tokens,
            "visual_tokens_kept": self.visual_tokens_kept,
            "prefill_time_s": round(self.prefill_time_s, 6),
            "decode_time_s": round(self.decode_time_s, 6),
            "queue_time_s": round(self.queue_time_s, 6),
            "batch_size": self.batch_size,
            "prompt_cache_hit": self.prompt_cache_hit,
            "prefix_cache_hit": self.prompt_cache_hit,  # its older name, kept for clients that read it
        }


@dataclass
class Outcome:
    text: str
    finish_reason: str  # stop, length, cancelled
    usage: Usage
    kept_patches: list[list[int]] = field(default_factory=list)  # per image: kept patch indices (row-major)
    grid: tuple[int, int] | None = None


class Job:
    def __init__(self, request: ChatRequest, prompt: str, inputs: dict, loop: asyncio.AbstractEventLoop):
        self.id = f"chatcmpl-cm{next(_ids)}"
        self.created = int(time.time())
        self.request = request
        self.prompt = prompt
        self.inputs = inputs  # the processor's encoding of this request alone (made once, on arrival)
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.key = method_key(request.method)
        self.enqueued_at = time.perf_counter()
        self.cancelled = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()
        self.emitted = False  # whether any event was sent (a failed batch is retried job by job only before)
        self._loop = loop

    def emit(self, kind: str, payload) -> None:
        """kind: 'text' (a str), 'done' (an Outcome) or 'error' (an APIError)."""
        self.emitted = True
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more

    def cancel(self) -> None:
        self.cancelled.set()
