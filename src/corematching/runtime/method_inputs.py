"""What a method asked for (SparsityMethod.wants_inputs), gathered during the call that chooses its tokens.

Hooks catch what passes by — the prune layer's attention input (for the last token's attention row), the first
decoder layer's input (the input embeddings), the vision tower's feature layer input (for the attention its tokens
received) and the tower's pixel input (for the image fingerprints) — and `fill` puts everything into the TokenBatch
when the tokens are chosen, at the entry of layer K + 1. Only the inputs asked for are computed; each is per
sample, so batch mates never change it.

The vision tower may run outside the call that uses it: `generate` encodes the images first and passes the tower's
output object in (`mm_encoder_outputs`). So what the tower hooks compute is also kept per output object (by its
identity, for as long as the object lives: `TowerResults`), where `fill` finds it when the call brought
pre-encoded images. Nothing is written onto transformers' objects.

What passes between hooks of one tower run (the attentions until the tower returns, the tower's output until the
feature packing reads it) is kept per thread: a tower run by another thread (generate() encodes images before it
calls the model) never mixes into it. So is the call the hooks capture for: the engine hands it over explicitly
with `begin` when a call that chooses tokens starts, and takes it back with `end`.
"""

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModeError, UnsupportedModelError
from ..methods import SparsityMethod, TokenBatch
from ..models import EntryCall, ModelAdapter
from ..selection import HASH_MODULUS, hash_mix
from .weak_table import forget_when_collected

TOWER_ATTENTION = "vision_attention"  # per tower output: [N images, P] attention received
TOWER_KEYS = "vision_keys"  # per tower output: [N images, P, d] keys over heads
TOWER_HASHES = "image_hashes"  # per tower output: [N images] hashes of its pixel inputs
# per tower output whose patches are packed into the image tokens (tiles, unpadding, newline tokens):
# [visual tokens of its images, in order] the flat index (tower row * P + patch) of each token's patch
TOWER_SOURCES = "patch_sources"


ONE_PER_PATCH = (
    "methods that read the vision tower need one visual token per patch of its feature layer (a projector that "
    "pools or merges patches, as in Gemma 3, Qwen-VL or Idefics3, breaks that)"
)


class MethodInputs:
    def __init__(self, adapter: ModelAdapter, method: SparsityMethod, stage_layers: tuple[int, ...]):
        self.adapter = adapter
        self.wanted = frozenset(method.wants_inputs()) if stage_layers else frozenset()
        self.stage_layers = stage_layers
        self.prune_layer = stage_layers[0] if stage_layers else None
        self._tower_run = _TowerRun()  # per thread: what one tower run's hooks pass on, and the call they serve
        self.tower_results = TowerResults()  # tower output object -> what the hooks computed for it
        self._tower_hooked = False  # whether the tower's output gets what the hooks computed
        reads_tower = bool({"vision_attention", "vision_keys"} & self.wanted)
        self.packing = adapter.feature_packing() if reads_tower else None  # (owner, name, sources) or None

    def hooks(self) -> list[tuple[nn.Module, Callable, bool]]:
        """(module, hook with kwargs, after) to install for the session: a forward hook when `after`, else a
        forward pre-hook."""
        hooks = []
        if "last_attention" in self.wanted:  # at every stage's layer
            for layer in self.stage_layers:
                hooks.append((self.adapter.attention_module(layer), self._prune_attention_hook(layer), False))
        if "input_embeddings" in self.wanted and self.prune_layer >= 0:
            hooks.append((self.adapter.decoder_layers[0], self._on_first_layer, False))
        if {"vision_attention", "vision_keys"} & self.wanted:
            hooks.append((self.adapter.vision_attention_module(), self._on_vision_attention, False))
            hooks.append((self.adapter.feature_tower_module(), self._on_tower_done, True))
        elif "image_fingerprint" in self.wanted:
            try:  # optional: without it, images encoded before the call (generate) get no fingerprint
                hooks.append((self.adapter.vision_tower_module(), self._on_tower_done, True))
            except UnsupportedModelError:
                pass
        self._tower_hooked = any(hook == self._on_tower_done for _, hook, _ in hooks)
        return hooks

    def begin(self, call: Any) -> None:
        """The calling thread's hooks now capture for `call` (a LiveCall that chooses tokens: what they catch goes
        into `call.tokens.captured`; the last-attention hook reads `call.decision_valid`)."""
        self._tower_run.call = call

    def end(self) -> None:
        """The calling thread's call is over: the hooks capture for none."""
        self._tower_run.call = None

    def _choosing_call(self):
        return self._tower_run.call

    def _prune_attention_hook(self, layer: int) -> Callable:
        def on_prune_attention(module, args, kwargs):
            call = self._choosing_call()
            if call is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                with torch.no_grad():
                    call.tokens.captured["last_attention"] = self.adapter.last_token_attention(
                        layer, hidden, kwargs.get("position_embeddings"), call.decision_valid
                    )

        return on_prune_attention

    def _on_first_layer(self, module, args, kwargs):
        call = self._choosing_call()
        if call is not None:
            call.tokens.captured["input_embeddings"] = args[0] if args else kwargs["hidden_states"]

    def _on_vision_attention(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            if "vision_attention" in self.wanted:
                self._tower_run.attention.append(self.adapter.vision_token_attention(hidden))
            if "vision_keys" in self.wanted:
                self._tower_run.keys.append(self.adapter.vision_token_keys(hidden))

    def _on_tower_done(self, module, args, kwargs, output):
        """Attach what the tower hooks computed to the tower's output (and to the running call, if any)."""
        pixels = args[0] if args else kwargs.get("pixel_values")
        found, run = {}, self._tower_run
        if run.attention:
            found[TOWER_ATTENTION] = torch.cat(run.attention, dim=0)
            run.attention = []
        if run.keys:
            found[TOWER_KEYS] = torch.cat(run.keys, dim=0)
            run.keys = []
        if "image_fingerprint" in self.wanted and isinstance(pixels, torch.Tensor):
            images = self.adapter.tower_images(pixels, kwargs)
            found[TOWER_HASHES] = torch.stack([content_hash(image) for image in images])
        self._attach(output, found)
        if self.packing is not None:
            run.last_output = output

    def _attach(self, output, found: dict) -> None:
        """What the hooks computed is kept for the tower's output object (generate() passes it back in) and goes
        to the running call, if it chooses tokens."""
        self.tower_results.add(output, found)
        call = self._choosing_call()
        if call is not None:
            call.tokens.captured.update(found)

    def replacements(self) -> list[tuple[object, str, Callable]]:
        """(owner, method name, wrapper) to install for the session: the family's feature packing, wrapped to
        record which tower patch each visual token holds, when the method reads the tower."""
        if self.packing is None:
            return []
        owner, name, sources_of = self.packing
        original = getattr(owner, name)

        def packed(*args, **kwargs):
            result = original(*args, **kwargs)
            run = self._tower_run
            if run.last_output is not None:
                with torch.no_grad():
                    self._attach(run.last_output, {TOWER_SOURCES: sources_of(original, args, kwargs)})
                run.last_output = None
            return result

        return [(owner, name, packed)]

    def fill(
        self, batch: TokenBatch, captured: dict, entry: EntryCall, visual: torch.Tensor, hidden_states: torch.Tensor
    ) -> None:
        """Put what the method asked for into batch, from what the hooks `captured` in the call `entry` (whose
        visual tokens are visual [B, T]); hidden_states [B, T, H]: the input of the layer after the stage's layer
        (a later stage of several gets only hidden_states and last_attention: the method's checks refuse the
        others)."""
        call = _Captured(captured, entry, visual)
        if "hidden_states" in self.wanted:
            batch.hidden_states = hidden_states
        if "input_embeddings" in self.wanted:
            batch.input_embeddings = hidden_states if self.prune_layer == -1 else captured["input_embeddings"]
        if "last_attention" in self.wanted:
            batch.last_attention = captured["last_attention"]
        if "vision_attention" in self.wanted:
            per_patch = self._tower_patches(call, batch, TOWER_ATTENTION, "the vision tower's attention")
            batch.vision_attention = _scatter_visual(per_patch, call.visual, "vision attention")
        if "vision_keys" in self.wanted:
            per_patch = self._tower_patches(call, batch, TOWER_KEYS, "the vision tower's keys")
            batch.vision_keys = _scatter_visual(per_patch, call.visual, "vision keys")
        if "image_fingerprint" in self.wanted:
            batch.image_fingerprint = self._fingerprints(call, batch)
        captured.clear()

    def _tower_patches(self, call, batch: TokenBatch, name: str, what: str) -> torch.Tensor:
        """[V, ...]: what the tower hooks computed per patch ([N tower rows, P, ...]), one row per visual token of
        the call in order: the patches in order, or, where the family packs them, each token's own patch."""
        per_row = self._from_tower(call, name, what)
        if self.packing is None:
            per_row = _rows_of_batch(per_row, batch)
            if per_row is None:
                raise UnsupportedModelError("the vision tower ran on other images than the call's: " + ONE_PER_PATCH)
            return per_row.flatten(0, 1)
        sources = self._from_tower(call, TOWER_SOURCES, "which tower patch each visual token holds")
        per_patch = per_row.flatten(0, 1)
        if sources.numel() and int(sources.max()) >= per_patch.shape[0]:
            raise UnsupportedModelError("the vision tower ran on other images than the call's packed features")
        per_token = _expanded(per_patch[sources.to(per_row.device)], call.visual.sum(1).tolist())
        if per_token is None:
            raise UnsupportedModelError("the vision tower ran on other images than the call's")
        return per_token

    def _fingerprints(self, call, batch: TokenBatch) -> torch.Tensor:
        """[B, T] the hash of each visual token's image input; 0 everywhere when the family's image inputs cannot
        be told apart per image (then every image draws from its positions alone)."""
        if isinstance(call.entry.image_inputs, torch.Tensor):  # pixel values (or features) given directly
            try:
                hashes = torch.stack([content_hash(image) for image in self.adapter.images_of_call(call.entry)])
            except UnsupportedModelError:
                hashes = None
        elif self._tower_hooked:
            hashes = self._from_tower(call, TOWER_HASHES, "the images' pixel values")
        else:
            hashes = None
        per_token = None if hashes is None else _per_visual_token(hashes.to(call.visual.device), batch)
        return per_token if per_token is not None else torch.zeros_like(batch.image_index)

    def _from_tower(self, call, name: str, what: str) -> torch.Tensor:
        """What the tower hooks attached, for the images of this call: computed in the call, or attached to the
        pre-encoded image outputs it brought."""
        if name in call.captured:
            return call.captured[name]
        value = self.tower_results.get(call.entry.image_inputs, name)
        if value is None:
            raise UnsupportedModeError(
                f"this method needs {what}, but the call's images were encoded outside this session (or the encoded "
                "outputs were copied, as beam search expands them); pass pixel values in the call"
            )
        return value


class TowerResults:
    """What the tower hooks computed, per tower output object: by the object's identity, while it lives (a copy of
    the object is another object, with nothing kept for it)."""

    def __init__(self):
        self._by_output: dict[int, tuple[weakref.ref, dict]] = {}

    def add(self, output, found: dict) -> None:
        key = id(output)
        entry = self._by_output.get(key)
        if entry is None or entry[0]() is not output:
            try:
                reference = weakref.ref(output, forget_when_collected(self._by_output, key))
            except TypeError:  # an output that cannot be referenced weakly: nothing kept for later calls
                return
            entry = self._by_output[key] = (reference, {})
        entry[1].update(found)

    def get(self, output, name: str):
        """What was kept under `name` for `output` (None: nothing)."""
        entry = self._by_output.get(id(output))
        return entry[1].get(name) if entry is not None and entry[0]() is output else None


class _TowerRun(threading.local):
    """What the hooks of the calling thread's tower run pass on to each other."""

    def __init__(self):
        self.attention: list[torch.Tensor] = []  # [images, P] per feature-layer call, until the tower returns
        self.keys: list[torch.Tensor] = []
        self.last_output = None  # the latest tower output, which the feature packing then describes
        self.call = None  # the LiveCall that chooses tokens in this thread (None: none)


class _Captured:
    """What `fill` reads of the call: what the hooks caught, its entry call and its visual tokens [B, T]."""

    def __init__(self, captured: dict, entry: EntryCall, visual: torch.Tensor):
        self.captured, self.entry, self.visual = captured, entry, visual


def content_hash(values: torch.Tensor) -> torch.Tensor:
    """A hash in [0, 2**31) of a tensor's exact bytes (long scalar): equal inputs give equal hashes."""
    data = values.detach().contiguous().reshape(-1).view(torch.uint8).long()
    weights = hash_mix(torch.arange(1, data.numel() + 1, device=data.device))
    total = (data * weights).sum() % HASH_MODULUS  # wraps (deterministically) past 2**24 bytes
    return hash_mix(total + data.numel())


def _scatter_visual(flat_values: torch.Tensor, visual: torch.Tensor, name: str) -> torch.Tensor:
    """Values [V, ...] of the batch's V visual tokens in order (sample by sample) -> [B, T, ...], 0 elsewhere."""
    count = int(visual.sum())
    if flat_values.shape[0] != count:
        raise UnsupportedModelError(
            f"the {name} covers {flat_values.shape[0]} patches but the call has {count} visual tokens: "
            + ONE_PER_PATCH
        )
    out = torch.zeros(*visual.shape, *flat_values.shape[1:], dtype=flat_values.dtype, device=visual.device)
    out[visual] = flat_values.to(visual.device)
    return out


def _rows_of_batch(per_image: torch.Tensor, batch: TokenBatch) -> torch.Tensor | None:
    """per_image [N, ...] over the images as the tower saw them -> one entry per image of the batch's rows."""
    return _expanded(per_image, (batch.image_index.amax(dim=1) + 1).clamp(min=0).tolist())


def _expanded(values: torch.Tensor, per_row: list[int]) -> torch.Tensor | None:
    """values [N, ...], `per_row[r]` entries for each row of the batch in order, computed before generation
    expanded the batch (beam search, several return sequences): then each sample's entries are repeated for its
    e consecutive rows, as `generate` expands the encoded images. None when the counts do not fit either way."""
    total, count = sum(per_row), values.shape[0]
    if total == count:
        return values
    rows = len(per_row)
    if count == 0 or total % count or rows % (total // count):
        return None
    expand = total // count
    groups, start = [], 0
    for first in range(0, rows, expand):
        size = per_row[first]
        if any(per_row[row] != size for row in range(first, first + expand)):
            return None
        groups += [values[start : start + size]] * expand
        start += size
    return torch.cat(groups) if start == count else None


def _per_visual_token(per_image: torch.Tensor, batch: TokenBatch) -> torch.Tensor | None:
    """per_image [N]: one value per image of the batch in order -> [B, T] at each image's visual tokens, 0 elsewhere;
    None when the batch does not have N images."""
    image_index = batch.image_index
    images_per_sample = (image_index.amax(dim=1) + 1).clamp(min=0)  # [B]
    first_image = images_per_sample.cumsum(0) - images_per_sample  # [B] batch-wide number of each sample's first
    per_image = _rows_of_batch(per_image, batch)
    if per_image is None:
        return None
    number = (first_image.unsqueeze(1) + image_index).clamp(0, max(per_image.numel() - 1, 0))
    return torch.where(image_index >= 0, per_image[number], 0)
