"""The engine: carries a method's decisions out inside the model's own forward passes.

Every call of the adapter's entry module is classified once, at its start:
  prefill   fresh inputs with images: the method chooses tokens (after the prune layer K) and core neurons;
            layers > K run on the kept tokens only, packed per sample; FFNs run densely.
  decode    a call that continues the KV cache of the latest prefill: layers > K attend to the kept prompt
            tokens plus the generated ones; FFNs of the neuron layers use the sliced core-neuron weights.
  continue  a call without past tokens that extends the latest prompt (same tokens, padding and images,
            the images checked through the language model's input embeddings), as in generation with
            use_cache=False: recomputed with the prompt's decisions, the new tokens decoding with core
            neurons, which gives what cached decoding gives.
  dense     anything else (no image, a foreign cache, a 4-D mask): the model runs untouched.
Hooks call in here: `on_entry` / `on_entry_done` around the entry module, `on_language_model` before the
language model, `on_layer` before each decoder layer after K, `ffn_forward` in place of the FFN forward of the
watched layers.
"""

from dataclasses import dataclass, field
from enum import Enum

import torch

from ..methods import SparsityMethod, TokenBatch
from ..models import EntryCall, FFNParts, ModelAdapter
from .ffn import SlicedFFN, dense_ffn
from .masks import packed_attention_mask
from .packing import PackedLayout, extend_layout, pack_kept_tokens
from .records import SparsityRecord


class CallKind(Enum):
    DENSE = "dense"
    PREFILL = "prefill"
    DECODE = "decode"
    CONTINUE = "continue"


@dataclass
class PromptState:
    """What the latest prefill decided; lives until the next prefill."""

    input_ids: torch.Tensor | None  # [B, T0], to recognise continuations
    valid: torch.Tensor  # [B, T0] bool
    embeddings: torch.Tensor | None  # [B, T0, H] the language model's input (image features included)
    layout: PackedLayout | None  # kept prompt tokens after the prune layer
    neurons: dict[int, torch.Tensor]  # layer -> [B, k] sorted core neurons
    sparse_rows: torch.Tensor  # [B] bool: samples with visual tokens (the others stay dense)
    all_rows_sparse: bool
    cache: object  # the KV cache the prefill filled, or None
    sliced: dict[int, SlicedFFN | None] = field(default_factory=dict)  # gathered on first use

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]


@dataclass
class CallState:
    """One call of the entry module."""

    kind: CallKind
    entry: EntryCall
    may_continue: bool = False  # its tokens extend the latest prompt; its embeddings decide
    embeddings: torch.Tensor | None = None  # prefill: the language model's input embeddings
    # prefill only
    valid: torch.Tensor | None = None  # [B, T] bool
    visual: torch.Tensor | None = None  # [B, T] bool
    image_index: torch.Tensor | None = None  # [B, T] long, -1 outside images
    image_ordinal: torch.Tensor | None = None  # [B, T] long, -1 outside images
    prune_activations: torch.Tensor | None = None  # [B, T, F] at layer K, until tokens are chosen
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    keep: torch.Tensor | None = None  # [B, T] bool
    scores: torch.Tensor | None = None
    # layers after the prune layer
    layout: PackedLayout | None = None  # prefill / continue: the tokens gathered at layer K + 1
    decode_key_valid: torch.Tensor | None = None  # decode: [B, keys] validity of the cached + new keys
    decode_all_valid: bool = False
    upper_inputs: dict | None = None  # kwargs every layer > K receives (mask, positions)
    cache: object = None  # the cache seen by the layers
    num_new: int = 0  # trailing tokens that decode with core neurons


class Engine:
    def __init__(self, adapter: ModelAdapter, method: SparsityMethod):
        self.adapter = adapter
        self.method = method
        num_layers = adapter.num_layers
        self.prune_layer = method.prune_layer_index()
        self.neuron_layers = frozenset(method.neuron_layer_indices(num_layers))
        self.watched_layers = set(self.neuron_layers)
        if self.prune_layer is not None and method.wants_prune_activations():
            self.watched_layers.add(self.prune_layer)
        self.upper_layers = range(self.prune_layer + 1, num_layers) if self.prune_layer is not None else range(0)
        self.changes_model = self.prune_layer is not None or bool(self.neuron_layers)
        self.prompt: PromptState | None = None
        self.call: CallState | None = None
        self.last: SparsityRecord | None = None

    def reset(self) -> None:
        self.prompt = None
        self.call = None

    # ------------------------------------------------------------------------------------------ entry calls

    def on_entry(self, args: tuple, kwargs: dict) -> None:
        self.call = None
        entry = self.adapter.read_entry_call(args, kwargs)
        if entry.input_ids is None and entry.inputs_embeds is None:
            return  # the model raises its own error
        mask = entry.attention_mask
        if mask is not None and mask.dim() != 2:
            return  # a custom 4-D mask: run dense
        past = _cache_length(entry.cache, 0)
        if past > 0:
            if self.prompt is not None and entry.cache is self.prompt.cache and self.changes_model:
                self.call = self._decode_call(entry, past)
            return
        call = self._fresh_call(entry)
        if self.changes_model and self._extends_prompt_tokens(entry):
            call.may_continue = True  # settled in on_language_model, once the image features are in
            self.call = call
            return
        self._start_fresh(call)

    def on_language_model(self, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the language model. Its input embeddings hold the image features: a call whose tokens
        extend the latest prompt continues it only if the prompt's embeddings (images included) match."""
        call = self.call
        if call is None or call.kind in (CallKind.DECODE, CallKind.CONTINUE):
            return
        embeddings = self.adapter.language_model_embeddings(args, kwargs)
        if call.may_continue:
            prompt = self.prompt
            same_prompt = (
                embeddings is not None
                and prompt.embeddings is not None
                and embeddings.shape[0] == prompt.embeddings.shape[0]
                and torch.equal(embeddings[:, : prompt.length], prompt.embeddings)
            )
            if same_prompt:
                self.call = self._continue_call(call.entry)
                return
            call.may_continue = False
            self._start_fresh(call)
        if self.call is not None and self.call.kind == CallKind.PREFILL:
            self.call.embeddings = embeddings

    def _start_fresh(self, call: CallState) -> None:
        """A call that starts a new prompt: prefill, or dense (still recorded as the latest prefill)."""
        if call.kind == CallKind.PREFILL:
            self.call = call
            return
        self.call = None
        self.prompt = None
        self.last = SparsityRecord(type(self.method).__name__, None, call.valid, call.visual)

    def on_entry_done(self) -> None:
        call, self.call = self.call, None
        if call is None:
            return
        if call.kind == CallKind.CONTINUE and call.cache is not None:
            self.prompt.cache = call.cache  # later decode steps continue this cache
        if call.kind == CallKind.PREFILL:
            self._commit_prefill(call)

    def _fresh_call(self, entry: EntryCall) -> CallState:
        """The state of a call without past tokens: a prefill when it has images and the method changes the
        model, dense otherwise."""
        device = entry.device
        batch, length = entry.batch_size, entry.length
        if entry.attention_mask is not None:
            valid = entry.attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        else:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        visual = self.adapter.visual_mask(entry) & valid
        if entry.image_inputs is None:
            visual = torch.zeros_like(visual)
        ordinal = visual.long().cumsum(1) - 1  # [B, T] index among the sample's visual tokens
        per_image = self.adapter.tokens_per_image
        image_index = ordinal // per_image if per_image else torch.zeros_like(ordinal)
        image_ordinal = ordinal % per_image if per_image else ordinal
        outside = torch.full_like(ordinal, -1)
        kind = CallKind.PREFILL if entry.image_inputs is not None and self.changes_model else CallKind.DENSE
        return CallState(
            kind=kind,
            entry=entry,
            valid=valid,
            visual=visual,
            image_index=torch.where(visual, image_index, outside),
            image_ordinal=torch.where(visual, image_ordinal, outside),
        )

    def _commit_prefill(self, call: CallState) -> None:
        keep = call.keep if call.keep is not None else call.valid
        sparse_rows = call.visual.any(1)
        self.prompt = PromptState(
            input_ids=call.entry.input_ids,
            valid=call.valid,
            embeddings=call.embeddings,
            layout=call.layout,
            neurons=call.neurons,
            sparse_rows=sparse_rows,
            all_rows_sparse=bool(sparse_rows.all()),
            cache=call.cache,
        )
        self.last = SparsityRecord(
            method=type(self.method).__name__,
            prune_layer=self.prune_layer,
            keep_mask=keep,
            visual_mask=call.visual,
            neurons=dict(call.neurons),
            token_scores=call.scores,
        )

    def _decode_call(self, entry: EntryCall, past: int) -> CallState:
        prompt = self.prompt
        if entry.batch_size != prompt.batch_size:
            raise RuntimeError(
                f"the batch changed from {prompt.batch_size} to {entry.batch_size} while decoding from a "
                "sparsified prompt; beam search and batch reordering are not supported"
            )
        generated = past - prompt.length  # tokens already appended after the prompt
        if generated < 0:
            raise RuntimeError("the KV cache is shorter than the sparsified prompt; it cannot be continued")
        call = CallState(kind=CallKind.DECODE, entry=entry, num_new=entry.length, cache=entry.cache)
        if prompt.layout is not None:
            expected = prompt.layout.width + generated
            found = _cache_length(entry.cache, self.prune_layer + 1)
            if found != expected:
                raise RuntimeError(
                    f"the KV cache of layer {self.prune_layer + 1} holds {found} tokens, but the sparsified "
                    f"prompt plus the generated tokens make {expected}"
                )
            new_valid, all_new_valid = self._new_token_validity(entry, prompt.length, past + entry.length)
            call.decode_key_valid = torch.cat([prompt.layout.slot_valid, new_valid], dim=1)
            call.decode_all_valid = prompt.layout.all_valid and all_new_valid
        return call

    def _continue_call(self, entry: EntryCall) -> CallState:
        prompt = self.prompt
        call = CallState(kind=CallKind.CONTINUE, entry=entry, num_new=entry.length - prompt.length)
        if prompt.layout is not None:
            new_valid, all_new_valid = self._new_token_validity(entry, prompt.length, entry.length)
            call.layout = extend_layout(
                prompt.layout, prompt.length, entry.length, None if all_new_valid else new_valid
            )
        return call

    def _new_token_validity(self, entry: EntryCall, start: int, stop: int) -> tuple[torch.Tensor, bool]:
        """Validity [B, stop - start] of the tokens after the prompt, and whether it is all True by
        construction (no 2-D mask was given, so no host check is needed)."""
        if entry.attention_mask is None:
            return torch.ones(entry.batch_size, stop - start, dtype=torch.bool, device=entry.device), True
        return entry.attention_mask[:, start:stop].to(device=entry.device, dtype=torch.bool), False

    def _extends_prompt_tokens(self, entry: EntryCall) -> bool:
        """Whether the call's tokens and padding are the latest prompt's followed by more tokens."""
        prompt = self.prompt
        if prompt is None or prompt.input_ids is None or entry.input_ids is None:
            return False
        if entry.batch_size != prompt.batch_size or entry.length <= prompt.length:
            return False
        length = prompt.length
        if not torch.equal(entry.input_ids[:, :length], prompt.input_ids):
            return False
        if entry.attention_mask is None:
            return bool(prompt.valid.all())
        return torch.equal(entry.attention_mask[:, :length].to(torch.bool), prompt.valid)

    # ------------------------------------------------------------------------------------------ decoder layers

    def on_layer(self, layer: int, args: tuple, kwargs: dict):
        """Pre-hook of decoder layer `layer` > K: returns the rewritten (args, kwargs), or None."""
        call = self.call
        if call is None or call.kind == CallKind.DENSE:
            return None
        inputs = self.adapter.read_layer_inputs(args, kwargs)
        if layer == self.prune_layer + 1:
            call.cache = inputs.cache
            if call.kind == CallKind.PREFILL:
                self._choose_tokens(call)
            self._prepare_upper_inputs(call, inputs)
            if call.layout is not None:  # prefill / continue: gather the surviving tokens
                hidden = _gather_hidden(inputs.hidden_states, call.layout.source_index)
                return self.adapter.write_layer_inputs(args, kwargs, hidden_states=hidden, **call.upper_inputs)
        if call.upper_inputs is None:
            return None
        return self.adapter.write_layer_inputs(args, kwargs, **call.upper_inputs)

    def _choose_tokens(self, call: CallState) -> None:
        batch = TokenBatch(
            valid_mask=call.valid,
            visual_mask=call.visual,
            image_index=call.image_index,
            image_ordinal=call.image_ordinal,
            image_grid=self.adapter.image_grid,
            activations=call.prune_activations,
        )
        with torch.no_grad():
            if self.prune_layer in self.neuron_layers and batch.activations is not None:
                decision, call.neurons[self.prune_layer] = self.method.select_tokens_and_neurons(
                    batch, call.valid, self.prune_layer
                )
            else:
                decision = self.method.select_tokens(batch)
        call.prune_activations = None
        call.keep = call.valid & (~call.visual | (decision.keep_visual & call.visual))
        call.scores = decision.scores
        call.layout = pack_kept_tokens(call.keep)

    def _prepare_upper_inputs(self, call: CallState, inputs) -> None:
        implementation = self.adapter.attention_implementation()
        dtype = inputs.hidden_states.dtype
        if call.layout is not None:
            layout = call.layout
            call.upper_inputs = {
                "attention_mask": packed_attention_mask(
                    layout.slot_valid, layout.width, implementation, dtype, layout.all_valid
                ),
                "position_ids": self.adapter.gather_position_ids(inputs.position_ids, layout.source_index),
                "position_embeddings": self.adapter.gather_position_embeddings(
                    inputs.position_embeddings, layout.source_index
                ),
            }
        elif call.decode_key_valid is not None:
            call.upper_inputs = {
                "attention_mask": packed_attention_mask(
                    call.decode_key_valid, call.num_new, implementation, dtype, call.decode_all_valid
                )
            }

    # ------------------------------------------------------------------------------------------ FFNs

    def ffn_forward(self, layer: int, parts: FFNParts, hidden: torch.Tensor) -> torch.Tensor:
        call = self.call
        if call is None or call.kind == CallKind.DENSE:
            return dense_ffn(parts, hidden)[0]
        if call.kind == CallKind.PREFILL:
            out, activation = dense_ffn(parts, hidden)
            self._observe(call, layer, activation)
            return out
        if layer not in self.neuron_layers:
            return dense_ffn(parts, hidden)[0]
        sliced = self._sliced(layer, parts)
        if sliced is None:
            return dense_ffn(parts, hidden)[0]
        num_new = call.num_new
        if num_new == hidden.shape[1]:
            return self._core_neuron_ffn(sliced, parts, hidden)
        # continue: the prompt part runs densely, the new tokens with core neurons
        head = dense_ffn(parts, hidden[:, :-num_new])[0]
        tail = self._core_neuron_ffn(sliced, parts, hidden[:, -num_new:])
        return torch.cat([head, tail], dim=1)

    def _observe(self, call: CallState, layer: int, activation: torch.Tensor) -> None:
        """Prefill: keep the prune layer's activations, and choose the core neurons of neuron layers."""
        activation = activation.detach()
        if layer == self.prune_layer and self.method.wants_prune_activations():
            call.prune_activations = activation  # its neurons are chosen together with the tokens
            return
        if layer in self.neuron_layers:
            past_prune = self.prune_layer is not None and layer > self.prune_layer
            token_mask = call.layout.slot_valid if past_prune else call.valid
            with torch.no_grad():
                call.neurons[layer] = self.method.select_neurons(activation, token_mask, layer)

    def _sliced(self, layer: int, parts: FFNParts) -> SlicedFFN | None:
        """The layer's core-neuron FFN, gathered on first use after the prefill (None: all neurons are core)."""
        prompt = self.prompt
        if layer not in prompt.sliced:
            neurons = prompt.neurons[layer]
            full = neurons.shape[1] == parts.up.weight.shape[0]
            prompt.sliced[layer] = None if full else SlicedFFN.gather(parts, neurons)
        return prompt.sliced[layer]

    def _core_neuron_ffn(self, sliced: SlicedFFN, parts: FFNParts, hidden: torch.Tensor) -> torch.Tensor:
        out = sliced(hidden)
        if self.prompt.all_rows_sparse:
            return out
        # Samples without visual tokens run dense, as they would alone.
        dense = dense_ffn(parts, hidden)[0]
        return torch.where(self.prompt.sparse_rows.view(-1, 1, 1), out, dense)


def _cache_length(cache, layer: int) -> int:
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is not None and layer >= len(layers):
        return 0
    return int(cache.get_seq_length(layer))


def _gather_hidden(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] at index [B, L] -> [B, L, H]."""
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
