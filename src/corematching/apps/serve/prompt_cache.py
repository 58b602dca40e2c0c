"""The prompt cache: the pruned prefill of a repeated image + whole prompt, kept to be continued from a copy.

An entry is keyed by the sparsity setting, the images' digests and the prompt text; it holds the KV cache as the
prefill left it, the logits of the first generated token and what the prefill decided (visual tokens kept).
A hit never runs the prefill: the worker samples the first token from the stored logits and decodes from a
deep copy of the stored cache, so the entry stays as it was for the next hit.

The cache is bounded twice: at most `max_entries` entries and `max_bytes` bytes of tensors (the KV cache's keys
and values, the stored logits and prompt, and the session's sliced FFNs that the stored cache keeps alive); the
least recently used entries go first, and an entry larger than the whole bound is not stored.

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
    nbytes: int = 0  # its tensors' bytes (set by PromptCache.put)
    held_bytes: int = 0  # what its cache keeps alive beside it: the session's sliced FFNs (Session.held_bytes_of)
    record: object = None  # continuous batching: the session's record of the prefill (what it kept)


def prompt_key(job) -> tuple:
    return (job.key, tuple(image.digest for image in job.request.images), job.prompt)


def tensor_bytes(value, seen: set | None = None, depth: int = 0) -> int:
    """Bytes of the tensors reachable from `value` (a cache object, its layers, lists, dicts, dataclasses), each
    storage counted once."""
    seen = set() if seen is None else seen
    if depth > 6 or id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = ("storage", storage.data_ptr(), value.device)
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item, seen, depth + 1) for item in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(item, seen, depth + 1) for item in value.values())
    attributes = getattr(value, "__dict__", None)
    if attributes is None or isinstance(value, type):
        return 0
    return sum(tensor_bytes(item, seen, depth + 1) for item in attributes.values())


class PromptCache:
    """Prefills keyed by (sparsity setting, images, whole prompt), least recently used out first."""

    def __init__(self, max_entries: int, max_bytes: int | None = None):
        if max_entries < 1 or (max_bytes is not None and max_bytes < 1):
            raise ValueError("the prompt cache needs max_entries >= 1 and max_bytes >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # held by the entries now
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key, session_id: int) -> PrefillEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.session_id != session_id:
                self._remove(key)  # its session is gone; a pruned cache cannot outlive it
                entry = None
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key, entry: PrefillEntry) -> bool:
        """Store an entry (True), unless it alone is larger than max_bytes (False)."""
        entry.nbytes = tensor_bytes([entry.cache, entry.first_logits, entry.input_ids, entry.record]) + entry.held_bytes
        with self._lock:
            self._remove(key)
            if self.max_bytes is not None and entry.nbytes > self.max_bytes:
                return False
            self._entries[key] = entry
            self.bytes += entry.nbytes
            while len(self._entries) > self.max_entries or (self.max_bytes is not None
                                                             and self.bytes > self.max_bytes):
                self._remove(next(iter(self._entries)))
            return True

    def _remove(self, key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.nbytes

    def drop_session(self, session_id: int) -> None:
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.session_id == session_id]:
                self._remove(key)

    def __len__(self) -> int:
        return len(self._entries)


def continued_copy(entry: PrefillEntry):
    """A private copy of the entry's cache to decode into."""
    return copy.deepcopy(entry.cache)
