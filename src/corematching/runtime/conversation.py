"""Positions belong to the conversation.

Some families keep state on the model between the calls of one conversation, not on its KV cache: Qwen2-VL,
Qwen2.5-VL and Qwen3-VL keep `rope_deltas` (the offset between a token's index and its M-RoPE position after the
images), which the model sets at a prefill and reads to place every later token. Left there, the latest prefill
of any conversation decides the positions of all: a continuation of another cache (a copy, an interleaved
conversation, a second turn after another request) would decode at the wrong positions.

Under a session, after every call of the entry module the adapter's `conversation_state()` is saved on the cache
the call filled (cache_state.ConversationState), and before a call that continues a cache, the state saved on
it is put back into the model: each conversation continues exactly as if nothing had run in between. generate()
reads the state once before its first forward (to prepare the position ids of the whole call); the adapter
names those methods and the session wraps them so that they, too, see the continued cache's state.
"""

import torch

from ..models import ModelAdapter
from .cache_state import attach_conversation, conversation_of


class ConversationKeeper:
    """Saves the model's conversation state on the cache after each entry call, restores it before continuations."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self._batch: int | None = None  # rows of the entry call in progress (None: none entered)

    def enter(self, cache, past: int, batch: int) -> None:
        """At the start of an entry call with `past` cached tokens: a continuation gets its conversation back."""
        self._batch = batch
        if past > 0:
            restore(self.adapter, cache)

    def leave(self, cache) -> None:
        """At the end of an entry call: what the model now holds belongs to the cache it filled."""
        batch, self._batch = self._batch, None
        if batch is not None:
            save(self.adapter, cache, batch)

    def replacements(self) -> list[tuple[object, str, object]]:
        """(owner, method name, wrapper) for each method generate() calls before its first forward that reads the
        conversation state (signature (inputs_tensor, model_kwargs)): the wrapper restores the state of the cache
        being continued first, and saves what the method set on that cache (a new turn with images recomputes
        the positions of the whole conversation)."""
        adapter = self.adapter
        wrappers = []
        for owner, name in adapter.generation_position_readers():
            original = getattr(owner, name)

            def read_positions(inputs_tensor, model_kwargs, original=original):
                cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
                continued = cache is not None and int(cache.get_seq_length()) > 0
                if continued:
                    restore(adapter, cache)
                result = original(inputs_tensor, model_kwargs)
                if continued:
                    save(adapter, cache, None)
                return result

            wrappers.append((owner, name, read_positions))
        return wrappers


def save(adapter: ModelAdapter, cache, batch: int | None) -> None:
    """Attach the model's current conversation state to `cache`, its tensors expanded to the call's `batch` rows
    (generate() computes them per prompt before expanding the rows for beams or several sequences); a tensor whose
    rows fit no such expansion is not this call's (stale from another batch): None is saved in its place."""
    values = adapter.conversation_state()
    if values is None or cache is None:
        return
    attach_conversation(cache, {name: _rows_for(value, batch) for name, value in values.items()})


def restore(adapter: ModelAdapter, cache) -> None:
    """Put the conversation state saved on `cache` back into the model (nothing when none was saved)."""
    conversation = conversation_of(cache)
    if conversation is not None:
        adapter.restore_conversation_state(conversation.values)


def _rows_for(value: torch.Tensor | None, batch: int | None) -> torch.Tensor | None:
    if value is None or batch is None or value.shape[0] == batch:
        return value
    if value.shape[0] > 0 and batch % value.shape[0] == 0:
        return value.repeat_interleave(batch // value.shape[0], dim=0)
    return None
