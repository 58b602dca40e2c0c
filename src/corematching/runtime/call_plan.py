"""Classifying a call: every call of the adapter's entry module gets one plan, decided at its start.

The plan says what kind of call it is, by the KV cache it brings:
  FRESH    no past tokens (no cache, or an empty one), with images (or a method that also applies to text): the
           method chooses tokens after each prune stage layer and core neurons in the neuron layers.
  EXTEND   past tokens in a cache this session filled (its CacheState says which tokens each stage's layers
           hold), or a cache filled without the session that now gets an image: the new tokens attend to the
           kept ones; a new turn with images has its own visual tokens chosen among the new tokens.
  PASS_THROUGH  anything else: the model runs untouched.
It also holds what does not change during the call: the normalised 2-D padding mask, which new tokens are real
and visual, which image each belongs to, assisted decoding's candidates, the attention rule per layer, and one
FFN mode per watched layer (core_decoding.py), so that no layer call re-derives them.

A running call is a `LiveCall` (live_call.py): its plan, the token room's progress and the neurons chosen.
"""

from dataclasses import dataclass, field
from enum import Enum

import torch

from ..errors import UnsupportedModeError
from ..methods import SparsityMethod
from ..models import AttentionRule, EntryCall, ImageLayout, ModelAdapter
from .cache_state import CacheState, SessionToken, detach_state, state_of
from .core_decoding import FFNMode
from .masks import padding_mask_from_4d


class CallKind(Enum):
    PASS_THROUGH = "pass_through"  # the model runs untouched
    FRESH = "fresh"
    EXTEND = "extend"


@dataclass(frozen=True)
class LayerRoles:
    """What the method does at which decoder layer; fixed for the session."""

    stage_layers: tuple[int, ...]  # prune stage layers K1 < K2 < ...
    neuron_layers: frozenset  # layers whose FFNs decode with core neurons
    decode_ffn_layers: frozenset  # layers whose FFNs the method computes itself while decoding
    num_layers: int

    @classmethod
    def of(cls, method: SparsityMethod, num_layers: int) -> "LayerRoles":
        return cls(
            tuple(method.prune_stage_layers()),
            frozenset(method.neuron_layer_indices(num_layers)),
            frozenset(method.decode_ffn_layers(num_layers)),
            num_layers,
        )

    @property
    def prune_layer(self) -> int | None:
        return self.stage_layers[0] if self.stage_layers else None

    @property
    def upper_layers(self) -> range:
        """The layers after the first prune layer, whose inputs token removal rewrites."""
        return range(self.prune_layer + 1, self.num_layers) if self.stage_layers else range(0)


@dataclass
class CallPlan:
    """What a call is and does, decided at its start. Token tensors cover the call's new tokens: [B, q]."""

    kind: CallKind
    entry: EntryCall  # with the attention mask normalised to 2-D padding (or None)
    past: int  # tokens already in the cache (full sequence)
    state: CacheState | None  # extend: the state of the cache brought in
    valid: torch.Tensor  # [B, q] bool
    visual: torch.Tensor  # [B, q] bool
    images: ImageLayout | None  # which image each new token belongs to, and its grid
    neuron_rows: torch.Tensor  # [B] bool: rows that decode with core neurons (those with visual tokens)
    chooses_tokens: bool = False  # the method picks visual tokens in this call
    candidates: torch.Tensor | None = None  # [B, q] bool: assisted decoding's unverified candidates (None: none)
    ffn_modes: dict[int, FFNMode] = field(default_factory=dict)  # watched layer -> how its FFN runs
    rules: dict[int, AttentionRule] = field(default_factory=dict)  # layer -> its attention rule in this call


class CallClassifier:
    def __init__(self, adapter: ModelAdapter, method: SparsityMethod, roles: LayerRoles, token: SessionToken):
        self.adapter = adapter
        self.method = method
        self.roles = roles
        self.token = token
        self.watched_layers = set(roles.neuron_layers) | roles.decode_ffn_layers
        if method.wants_prune_activations():
            self.watched_layers.update(roles.stage_layers)
        self.changes_model = bool(roles.stage_layers or roles.neuron_layers or roles.decode_ffn_layers)

    def open(self, args: tuple, kwargs: dict) -> tuple[EntryCall, int, CacheState | None] | None:
        """Read a call and check its cache: (entry, past tokens, cache state), or None when the model raises its
        own error."""
        if torch.compiler.is_compiling():
            raise UnsupportedModeError(
                "torch.compile: a sparsified model changes its shapes with the tokens it keeps; run it uncompiled "
                "(generate(..., disable_compile=True) when a static cache would trigger compilation)"
            )
        entry = self.adapter.read_entry_call(args, kwargs)
        if entry.input_ids is None and entry.inputs_embeds is None:
            return None
        state = state_of(entry.cache)
        if state is not None and state.owner is not self.token:
            raise UnsupportedModeError(
                f"this KV cache was filled under another corematching session ({state.owner.description}); "
                "continue it inside that session"
            )
        past = cache_length(entry.cache, 0)
        if past == 0:
            detach_state(entry.cache)
            state = None
        elif state is not None and state.length != past:
            raise UnsupportedModeError(
                f"the KV cache holds {past} tokens but its sparsified prefill recorded {state.length}: it was "
                "changed outside the session"
            )
        return entry, past, state

    def plan(self, entry: EntryCall, past: int, state: CacheState | None, assisted) -> CallPlan | None:
        """The call's plan (None: a custom 4-D mask on a call that changes nothing: the model runs untouched)."""
        self.adapter.check_attention()
        if not self._normalise_mask(entry, past, state):
            return None
        return self._classify(entry, past, state, assisted)

    def _normalise_mask(self, entry: EntryCall, past: int, state: CacheState | None) -> bool:
        """Leave entry.attention_mask a 2-D padding mask or None; False: a 4-D mask the session leaves alone."""
        mask = entry.attention_mask
        if isinstance(mask, dict) and "full_attention" in mask:
            # one mask per layer type, built outside the model for a static cache; the global layers' mask holds
            # the padding (None: causal without padding), over positions only while their first layer's cache
            # holds every token
            if state is not None and state.removed_tokens and self._first_global_layer() > self.roles.prune_layer:
                raise UnsupportedModeError(
                    "a 4-D attention mask per layer type built over this KV cache, whose global-attention layers "
                    "hold only the kept tokens: its columns are cache slots, not positions; pass the 2-D padding "
                    "mask (generate() does under a session)"
                )
            mask = entry.attention_mask = mask["full_attention"]
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            padding = padding_mask_from_4d(mask, past, entry.length) if isinstance(mask, torch.Tensor) else None
            if padding is None:
                applies = entry.image_inputs is not None or self.method.applies_to_text()
                if state is not None or (applies and self.changes_model):
                    raise UnsupportedModeError(
                        "a custom 4-D attention mask: the session builds the masks of the layers after the prune "
                        "layer itself; pass a 2-D padding mask"
                    )
                return False
            entry.attention_mask = padding  # a causal padding mask, as generate() builds for static caches
        return True

    def _first_global_layer(self) -> int:
        """The first decoder layer without a sliding window (the number of layers when every layer slides)."""
        layers = range(self.adapter.num_layers)
        return next((layer for layer in layers if self.adapter.attention_rule(layer).sliding_window is None),
                    self.adapter.num_layers)

    def _classify(self, entry: EntryCall, past: int, state: CacheState | None, assisted) -> CallPlan:
        device = entry.device
        batch, length = entry.batch_size, entry.length
        if entry.attention_mask is not None:
            valid = entry.attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        else:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        visual = self.adapter.visual_mask(entry) & valid
        has_images = entry.image_inputs is not None
        if not has_images:
            visual = torch.zeros_like(visual)
        applies = has_images or self.method.applies_to_text()
        plan = CallPlan(
            kind=CallKind.PASS_THROUGH,
            entry=entry,
            past=past,
            state=state,
            valid=valid,
            visual=visual,
            images=self.adapter.image_layout(entry, visual) if has_images else None,
            neuron_rows=torch.ones_like(visual[:, 0]) if self.method.applies_to_text() else visual.any(1),
        )
        prunes = bool(self.roles.stage_layers)
        if past == 0:
            if applies and self.changes_model:
                plan.kind = CallKind.FRESH
                plan.chooses_tokens = prunes and has_images
                plan.candidates = assisted.candidates(entry.input_ids)
        elif state is None:
            if has_images and prunes:  # a dense cache gets a new image: its tokens are chosen from here on
                plan.kind = CallKind.EXTEND
                plan.chooses_tokens = True
        else:
            if state.decision_rows is not None and state.decision_rows.shape[0] != batch:
                raise UnsupportedModeError(
                    f"the batch has {batch} rows but the KV cache {state.decision_rows.shape[0]}: change the batch "
                    "through the cache (reorder_cache, batch_select_indices), not by passing other rows"
                )
            plan.kind = CallKind.EXTEND
            plan.chooses_tokens = has_images and prunes
        if plan.kind != CallKind.PASS_THROUGH:
            plan.ffn_modes = {layer: self._ffn_mode(plan, layer) for layer in self.watched_layers}
            plan.rules = {layer: self.adapter.attention_rule(layer, entry) for layer in self.roles.upper_layers}
        return plan

    def _ffn_mode(self, plan: CallPlan, layer: int) -> FFNMode:
        if plan.kind == CallKind.FRESH:
            return FFNMode.OBSERVE
        state, roles = plan.state, self.roles
        if plan.chooses_tokens and layer in roles.stage_layers:
            return FFNMode.MASKED  # the method reads this layer's activations
        if layer in roles.decode_ffn_layers and state is not None:
            return FFNMode.METHOD
        if state is not None and state.decision is not None and layer in state.decision.neurons:
            return FFNMode.SLICED
        return FFNMode.DENSE


def cache_length(cache, layer: int) -> int:
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is not None and layer >= len(layers):
        return 0
    return int(cache.get_seq_length(layer))
