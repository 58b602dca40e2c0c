"""Prefix caching: the pruned prefill of a repeated image + prompt, kept to be continued from a copy.

An entry is keyed by the sparsity setting, the images' digests and the prompt text; it holds the KV cache as the
prefill left it, the logits of the first generated token and what the prefill decided (visual tokens kept).
A hit never runs the prefill: the worker samples the first token from the stored logits and decodes from a
deep copy of the stored cache, so the entry stays as it was for the next hit.

Only a whole prompt is matched. With a text-conditioned method (CoreMatching's match set holds the prompt's
text), the tokens kept for a shorter prefix are not the ones a full prefill would keep, so continuing a
shorter prefix would change the answer.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class PrefillEntry:
    cache: object  # the KV cache right after the prefill (never continued itself)
    first_logits: torch.Tensor  # [V]
    input_ids: torch.Tensor  # [1, T]
    visual_tokens: int
    visual_tokens_kept: int
    kept_patches: list[list[int]]
    session_id: int  # the session whose decisions the cache carries


def prefix_key(job) -> tuple:
    return (job.key, tuple(image.digest for image in job.request.images), job.prompt)


class PrefixCache:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key, session_id: int) -> PrefillEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.session_id != session_id:
                del self._entries[key]  # its session is gone; a pruned cache cannot outlive it
                entry = None
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def contains(self, key) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key, entry: PrefillEntry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def drop_session(self, session_id: int) -> None:
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.session_id == session_id]:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


def continued_copy(entry: PrefillEntry):
    """A private copy of the entry's cache to decode into."""
    return copy.deepcopy(entry.cache)
