"""What a sparsified prefill decided lives with the KV cache it filled.

After a call under a session, the cache object carries a `CacheState`: which tokens the layers after each prune
stage hold (their index in the full sequence and whether each slot is a real token), how long the full
sequence is, and the core neurons chosen from the prefill. A later call reads the state of the cache it brings,
so interleaved conversations, deep copies of a cache (prefix caching) and beam search each continue from their
own state.

Beside it, a cache carries a `ConversationState`: what the model itself keeps between the calls of one
conversation (Qwen-VL's `rope_deltas`, kept on the model by transformers), as the model held it after the
conversation's latest call under a session, so that a continuation puts it back first (runtime/conversation.py).
It binds the cache to no session: a cache where nothing was removed stays usable anywhere.

The cache's class is swapped for a subclass (same data, same behaviour) that
  - keeps the state in step when generation edits the cache: `crop` (assisted decoding), `reorder_cache`
    (beam search), `batch_select_indices` and `batch_repeat_interleave`;
  - refuses to be extended once its session is gone (`update` raises), since a pruned cache continued by the
    plain model would be silently wrong.
"""

from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedModeError

STATE_ATTRIBUTE = "_corematching_state"
CONVERSATION_ATTRIBUTE = "_corematching_conversation"


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
class StageSlots:
    """The slots of the layers after one prune stage (up to the next stage's layer): rows follow the cache's."""

    index: torch.Tensor  # [B, L] long: full-sequence index of each slot
    valid: torch.Tensor  # [B, L] bool: False for padding slots
    all_valid: bool  # valid has no False (known on the host)

    @property
    def width(self) -> int:
        return self.index.shape[1]

    def select_rows(self, rows: torch.Tensor) -> "StageSlots":
        rows = rows.to(self.index.device)
        return StageSlots(self.index.index_select(0, rows), self.valid.index_select(0, rows), self.all_valid)

    def keep_first(self, width: int) -> "StageSlots":
        return StageSlots(self.index[:, :width], self.valid[:, :width], self.all_valid)


@dataclass
class CacheState:
    """Per cache; copied with it. Rows follow the cache's rows (beam search reorders both together)."""

    owner: SessionToken
    length: int  # tokens of the full sequence, as the layers up to the first prune layer hold them
    stages: list[StageSlots] = field(default_factory=list)  # per prune stage, its slots; empty: nothing removed
    decision: NeuronDecision | None = None  # core neurons for decoding, None when the method chose none
    decision_rows: torch.Tensor | None = None  # [B] long: row of the decision each cache row follows

    @property
    def removed_tokens(self) -> bool:
        return bool(self.stages)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.stages = [stage.select_rows(rows) for stage in self.stages]
        if self.decision_rows is not None:
            self.decision_rows = self.decision_rows.index_select(0, rows.to(self.decision_rows.device))

    @property
    def rows(self) -> int | None:
        """Rows of the cache the state knows of (None: it holds no per-row tensor)."""
        if self.stages:
            return self.stages[0].index.shape[0]
        return None if self.decision_rows is None else self.decision_rows.shape[0]


@dataclass
class ConversationState:
    """The model-level state of one conversation, per cache row; copied with the cache, rows follow its rows."""

    values: dict[str, torch.Tensor | None]  # name -> None, or a tensor whose first dim is the cache's rows

    def select_rows(self, rows: torch.Tensor) -> None:
        self.values = {
            name: None if value is None else value.index_select(0, rows.to(value.device))
            for name, value in self.values.items()
        }

    @property
    def rows(self) -> int | None:
        """Rows the state holds (None: it holds no tensor)."""
        return next((value.shape[0] for value in self.values.values() if value is not None), None)


def stage_of_layer(stage_layers: tuple[int, ...], layer: int) -> int:
    """Which stage's slots decoder layer `layer` holds: -1 up to the first prune layer (the full sequence), s for
    the layers after stage s's layer up to the next one's."""
    stage = -1
    for s, prune_layer in enumerate(stage_layers):
        if layer > prune_layer:
            stage = s
    return stage


def state_of(cache) -> CacheState | None:
    if cache is None:
        return None
    return getattr(cache, STATE_ATTRIBUTE, None)


def attach_state(cache, state: CacheState, stage_layers: tuple[int, ...]) -> None:
    """Give the cache its state (replacing any older one) and the class that keeps the state in step."""
    setattr(cache, STATE_ATTRIBUTE, state)
    cls = type(cache)
    if not getattr(cls, "_corematching_tracked", False):
        cache.__class__ = _tracked_class(cls)
    cache._corematching_stage_layers = tuple(stage_layers)


def conversation_of(cache) -> ConversationState | None:
    if cache is None:
        return None
    return getattr(cache, CONVERSATION_ATTRIBUTE, None)


def attach_conversation(cache, values: dict[str, torch.Tensor | None]) -> None:
    """Give the cache the model-level state of its conversation (replacing any older one), kept in step with the
    cache's rows."""
    setattr(cache, CONVERSATION_ATTRIBUTE, ConversationState(dict(values)))
    if not getattr(type(cache), "_corematching_tracked", False):
        cache.__class__ = _tracked_class(type(cache))
    if not hasattr(cache, "_corematching_stage_layers"):
        cache._corematching_stage_layers = ()  # nothing removed (attach_state sets the real ones)


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
    if state is None or tokens_to_remove == 0 or not state.removed_tokens:
        if state is not None:
            state.length -= abs(tokens_to_remove)
        return super(type(self), self).crop(tokens_to_remove)
    count = abs(tokens_to_remove)
    new_length = state.length - count
    dropped_counts = []  # per stage: the slots its layers drop
    for stage in state.stages:
        dropped = (stage.index >= new_length).sum(1)  # [B] slots of this stage's layers to drop
        dropped_count = int(dropped.max())
        if dropped_count != int(dropped.min()):
            raise UnsupportedModeError(
                "cropping this KV cache would remove different numbers of kept tokens per sample after a prune "
                "layer; crop only tokens that were generated after the sparsified prompt"
            )
        dropped_counts.append(dropped_count)
    stage_layers = self._corematching_stage_layers
    for index, layer in enumerate(self.layers):
        stage = stage_of_layer(stage_layers, index)
        layer.crop(-(count if stage < 0 else dropped_counts[stage]))
    state.length = new_length
    state.stages = [stage.keep_first(stage.width - n) for stage, n in zip(state.stages, dropped_counts)]


def _get_seq_length(self, layer_idx: int = 0) -> int:
    """The full sequence length, as generation reads it to place new tokens. It is what layer 0 holds, except when
    tokens were removed before layer 0 (prune layer -1): then every layer holds the kept tokens only, and the
    length is the recorded full length plus the tokens added since."""
    held = super(type(self), self).get_seq_length(layer_idx)
    state = state_of(self)
    stage_layers = self._corematching_stage_layers
    if state is None or stage_layers[:1] != (-1,) or not state.removed_tokens or held == 0:
        return held
    return state.length + held - state.stages[stage_of_layer(stage_layers, layer_idx)].width


def _select_conversation_rows(cache, rows: torch.Tensor) -> None:
    conversation = conversation_of(cache)
    if conversation is not None:
        conversation.select_rows(rows)


def _reorder_cache(self, beam_idx: torch.LongTensor):
    state = _check_owner(self)
    super(type(self), self).reorder_cache(beam_idx)
    if state is not None:
        state.select_rows(beam_idx)
    _select_conversation_rows(self, beam_idx)


def _batch_select_indices(self, indices: torch.Tensor):
    state = _check_owner(self)
    super(type(self), self).batch_select_indices(indices)
    if state is not None:
        state.select_rows(torch.as_tensor(indices).flatten())
    _select_conversation_rows(self, torch.as_tensor(indices).flatten())


def _batch_repeat_interleave(self, repeats: int):
    state = _check_owner(self)
    super(type(self), self).batch_repeat_interleave(repeats)
    if state is not None and state.rows is not None:
        state.select_rows(torch.arange(state.rows).repeat_interleave(repeats))
    conversation = conversation_of(self)
    if conversation is not None and conversation.rows is not None:
        conversation.select_rows(torch.arange(conversation.rows).repeat_interleave(repeats))


_TRACKED_METHODS = {
    "update": _update,
    "crop": _crop,
    "get_seq_length": _get_seq_length,
    "reorder_cache": _reorder_cache,
    "batch_select_indices": _batch_select_indices,
    "batch_repeat_interleave": _batch_repeat_interleave,
}
