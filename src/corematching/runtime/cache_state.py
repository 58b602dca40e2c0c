"""What a sparsified prefill decided lives with the KV cache it filled.

After a call under a session, the cache object carries a `CacheState`: which tokens the layers after the prune
layer hold (their index in the full sequence and whether each slot is a real token), how long the full
sequence is, and the core neurons chosen from the prefill. A later call reads the state of the cache it brings,
so interleaved conversations, deep copies of a cache (prefix caching) and beam search each continue from their
own state.

The cache's class is swapped for a subclass (same data, same behaviour) that
  - keeps the state in step when generation edits the cache: `crop` (assisted decoding), `reorder_cache`
    (beam search), `batch_select_indices` and `batch_repeat_interleave`;
  - refuses to be extended once its session is gone (`update` raises), since a pruned cache continued by the
    plain model would be silently wrong.
"""

from dataclasses import dataclass

import torch

from ..errors import UnsupportedModeError

STATE_ATTRIBUTE = "_corematching_state"


class SessionToken:
    """Identifies one session; shared (never copied) by the states of every cache the session produced."""

    def __init__(self, description: str):
        self.description = description
        self.active = True

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self


@dataclass
class NeuronDecision:
    """Core neurons chosen at a prefill: immutable, shared by a cache and its copies."""

    neurons: dict[int, torch.Tensor]  # layer -> [B0, k] sorted neuron indices (rows of the prefill batch)
    sparse_rows: torch.Tensor  # [B0] bool: rows that decode with their core neurons (the others run dense)
    all_sparse: bool  # every row decodes with its core neurons (known on the host: no sync while decoding)

    def __deepcopy__(self, memo):
        return self


@dataclass
class CacheState:
    """Per cache; copied with it. Rows follow the cache's rows (beam search reorders both together)."""

    owner: SessionToken
    length: int  # tokens of the full sequence, as the layers up to the prune layer hold them
    upper_index: torch.Tensor | None = None  # [B, L] long: full-sequence index of each slot of the layers after K
    upper_valid: torch.Tensor | None = None  # [B, L] bool: False for padding slots; both None: nothing removed
    upper_all_valid: bool = True  # upper_valid has no False (known on the host)
    decision: NeuronDecision | None = None  # core neurons for decoding, None when the method chose none
    decision_rows: torch.Tensor | None = None  # [B] long: row of the decision each cache row follows

    @property
    def removed_tokens(self) -> bool:
        return self.upper_index is not None

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.upper_index is not None:
            self.upper_index = self.upper_index.index_select(0, rows.to(self.upper_index.device))
            self.upper_valid = self.upper_valid.index_select(0, rows.to(self.upper_valid.device))
        if self.decision_rows is not None:
            self.decision_rows = self.decision_rows.index_select(0, rows.to(self.decision_rows.device))


def state_of(cache) -> CacheState | None:
    if cache is None:
        return None
    return getattr(cache, STATE_ATTRIBUTE, None)


def attach_state(cache, state: CacheState, prune_layer: int | None) -> None:
    """Give the cache its state (replacing any older one) and the class that keeps the state in step."""
    setattr(cache, STATE_ATTRIBUTE, state)
    cls = type(cache)
    if not getattr(cls, "_corematching_tracked", False):
        cache.__class__ = _tracked_class(cls)
    cache._corematching_prune_layer = prune_layer


def detach_state(cache) -> None:
    """Forget the state (a fresh prefill into a used cache object restarts it)."""
    if cache is not None and hasattr(cache, STATE_ATTRIBUTE):
        delattr(cache, STATE_ATTRIBUTE)


_TRACKED: dict[type, type] = {}


def _tracked_class(base: type) -> type:
    if base not in _TRACKED:
        _TRACKED[base] = type(f"Sparsified{base.__name__}", (base,), dict(_TRACKED_METHODS, _corematching_tracked=True))
    return _TRACKED[base]


def _check_owner(cache) -> CacheState | None:
    state = state_of(cache)
    if state is not None and not state.owner.active:
        raise UnsupportedModeError(
            f"this KV cache was filled under a corematching session ({state.owner.description}) that has been "
            "removed; its layers after the prune layer hold only the kept tokens, so the plain model cannot "
            "continue it. Continue it inside the session, or start again from the prompt"
        )
    return state


def _update(self, key_states, value_states, layer_idx, *args, **kwargs):
    _check_owner(self)
    return super(type(self), self).update(key_states, value_states, layer_idx, *args, **kwargs)


def _crop(self, tokens_to_remove: int) -> None:
    state = _check_owner(self)
    prune_layer = self._corematching_prune_layer
    if state is None or tokens_to_remove == 0 or not state.removed_tokens:
        if state is not None:
            state.length -= abs(tokens_to_remove)
        return super(type(self), self).crop(tokens_to_remove)
    count = abs(tokens_to_remove)
    new_length = state.length - count
    dropped_upper = (state.upper_index >= new_length).sum(1)  # [B] slots of the layers after K to drop
    upper_count = int(dropped_upper.max())
    if upper_count != int(dropped_upper.min()):
        raise UnsupportedModeError(
            "cropping this KV cache would remove different numbers of kept tokens per sample after the prune "
            "layer; crop only tokens that were generated after the sparsified prompt"
        )
    for index, layer in enumerate(self.layers):
        layer.crop(-upper_count if index > prune_layer else -count)
    state.length = new_length
    keep = state.upper_index.shape[1] - upper_count
    state.upper_index, state.upper_valid = state.upper_index[:, :keep], state.upper_valid[:, :keep]


def _get_seq_length(self, layer_idx: int = 0) -> int:
    """The full sequence length, as generation reads it to place new tokens. It is what layer 0 holds, except when
    tokens were removed before layer 0 (prune layer -1): then every layer holds the kept tokens only, and the
    length is the recorded full length plus the tokens added since."""
    held = super(type(self), self).get_seq_length(layer_idx)
    state = state_of(self)
    if state is None or self._corematching_prune_layer != -1 or not state.removed_tokens or held == 0:
        return held
    return state.length + held - state.upper_index.shape[1]


def _reorder_cache(self, beam_idx: torch.LongTensor):
    state = _check_owner(self)
    super(type(self), self).reorder_cache(beam_idx)
    if state is not None:
        state.select_rows(beam_idx)


def _batch_select_indices(self, indices: torch.Tensor):
    state = _check_owner(self)
    super(type(self), self).batch_select_indices(indices)
    if state is not None:
        state.select_rows(torch.as_tensor(indices).flatten())


def _batch_repeat_interleave(self, repeats: int):
    state = _check_owner(self)
    super(type(self), self).batch_repeat_interleave(repeats)
    if state is not None:
        rows = state.upper_index if state.upper_index is not None else state.decision_rows
        if rows is not None:
            state.select_rows(torch.arange(rows.shape[0], device=rows.device).repeat_interleave(repeats))


_TRACKED_METHODS = {
    "update": _update,
    "crop": _crop,
    "get_seq_length": _get_seq_length,
    "reorder_cache": _reorder_cache,
    "batch_select_indices": _batch_select_indices,
    "batch_repeat_interleave": _batch_repeat_interleave,
}
