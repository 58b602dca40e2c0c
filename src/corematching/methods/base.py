"""What every method shares: the tensors it decides from, what it returns, and argument checks.

A method decides *what* to keep (visual tokens per sample, core neurons per layer) from tensors; the runtime
carries the decision out. Methods never see model classes.
"""

from dataclasses import dataclass
from numbers import Integral, Real

import torch

from ..selection import ceil_ratio

# What a method may ask for (SparsityMethod.wants_inputs), filled into TokenBatch by the runtime.
METHOD_INPUTS = frozenset(
    {
        "hidden_states",  # TokenBatch.hidden_states: what enters layer K + 1
        "last_attention",  # TokenBatch.last_attention: the last prompt token's attention row at layer K
        "input_embeddings",  # TokenBatch.input_embeddings: what enters the language model's first layer
        "vision_attention",  # TokenBatch.vision_attention: attention each visual token got in the vision tower
        "vision_keys",  # TokenBatch.vision_keys: each visual token's key in the vision tower's feature layer
        "image_fingerprint",  # TokenBatch.image_fingerprint: a hash of each image's own input
    }
)


@dataclass
class TokenBatch:
    """One prefill batch, as the method sees it when it chooses tokens. Shapes [B, T] unless noted."""

    valid_mask: torch.Tensor  # bool: real tokens (False for padding)
    visual_mask: torch.Tensor  # bool: visual tokens
    image_index: torch.Tensor  # long: which image of the sample a visual token belongs to, -1 otherwise
    image_ordinal: torch.Tensor  # long: position of a visual token inside its image, -1 otherwise
    image_grid: tuple[int, int] | None  # (rows, cols) of every image's token grid, when all images share one
    activations: torch.Tensor | None  # [B, T, F] FFN activations at the prune layer, when the method asks
    grid_rows: torch.Tensor | None = None  # long: rows of the token's image grid (0 outside images / unknown)
    grid_cols: torch.Tensor | None = None  # long: columns of the token's image grid
    # Filled only when the method asks for them (SparsityMethod.wants_inputs):
    hidden_states: torch.Tensor | None = None  # [B, T, H] the hidden states entering layer K + 1
    last_attention: torch.Tensor | None = None  # [B, T] float: attention of each sample's last token at layer K,
    #   averaged over heads (softmax over the call's tokens; 0 at padding)
    input_embeddings: torch.Tensor | None = None  # [B, T, H] what enters layer 0: the image features (after the
    #   projector) at visual tokens, the token embeddings elsewhere
    vision_attention: torch.Tensor | None = None  # [B, T] float at visual tokens: attention the token's patch
    #   received in the vision tower's feature layer (from CLS where the tower has one, else the mean over queries)
    vision_keys: torch.Tensor | None = None  # [B, T, d] at visual tokens: the token's patch key in the tower's
    #   feature layer, averaged over heads
    image_fingerprint: torch.Tensor | None = None  # [B, T] long at visual tokens: a hash of the token's image
    #   input (its pixels), the same for that image whatever its batch mates (0 for a family whose image inputs
    #   cannot be split per image)
    stage: int = 0  # which prune stage chooses (methods with several, SparsityMethod.prune_stage_layers): at a
    #   later stage the batch holds only the tokens the previous stage kept (T is their packed width)


def instruction_mask(batch: TokenBatch) -> torch.Tensor:
    """Bool [B, T]: each sample's instruction, the text tokens after its last visual token (every text token when
    nothing follows the image)."""
    positions = torch.arange(batch.valid_mask.shape[1], device=batch.valid_mask.device)
    last_visual = torch.where(batch.visual_mask, positions, -1).amax(dim=1, keepdim=True)  # [B, 1]
    text = batch.valid_mask & ~batch.visual_mask
    after = text & (positions > last_visual)
    return torch.where(after.any(1, keepdim=True), after, text)


@dataclass
class TokenDecision:
    """The visual tokens to keep, and the scores behind the choice when the method has any."""

    keep_visual: torch.Tensor  # bool [B, T], True only at kept visual tokens
    scores: torch.Tensor | None = None  # [B, T] float, meaningful at visual tokens
    merged_hidden: torch.Tensor | None = None  # [B, T, H]: replaces the hidden states entering layer K + 1 at the
    #   kept tokens (values at removed tokens are ignored); None keeps them as they are


class SparsityMethod:
    """Base of all methods. Subclasses are dataclasses and validate their fields in __post_init__."""

    def prune_layer_index(self) -> int | None:
        """The layer after which tokens are removed (-1: before the language model's first layer), or None when
        the method keeps every token."""
        return None

    def prune_stage_layers(self) -> tuple[int, ...]:
        """The layers after which tokens are removed, ascending: one per prune stage. At each, select_tokens
        chooses among the tokens the previous stage kept (TokenBatch.stage says which stage). The default is the
        one stage of prune_layer_index()."""
        prune_layer = self.prune_layer_index()
        return () if prune_layer is None else (prune_layer,)

    def wants_inputs(self) -> frozenset[str]:
        """What select_tokens reads beside the masks: names from METHOD_INPUTS (each costs some work, so a method
        asks only for what it uses)."""
        return frozenset()

    def applies_to_text(self) -> bool:
        """Whether samples without images are sparsified too (neuron methods); token methods leave them dense."""
        return False

    def wants_prune_activations(self) -> bool:
        """Whether select_tokens reads the prune layer's FFN activations."""
        return False

    def neuron_layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """Layers that decode with core neurons (sorted, unique)."""
        return ()

    def check_layers(self, num_layers: int) -> None:
        """Raise ValueError when a layer index does not exist in a model of num_layers layers."""
        prune_layer = self.prune_layer_index()
        if prune_layer is not None and not -1 <= prune_layer <= num_layers - 2:
            raise ValueError(
                f"prune_layer={prune_layer} is out of range: the language model has {num_layers} layers, "
                f"and tokens can be removed after layers 0..{num_layers - 2} (or before the first, -1)"
            )
        unknown = set(self.wants_inputs()) - METHOD_INPUTS
        if unknown:
            raise ValueError(f"{type(self).__name__} asks for unknown inputs {sorted(unknown)}")
        if prune_layer == -1 and {"hidden_states", "last_attention"} & set(self.wants_inputs()):
            raise ValueError("hidden_states and last_attention need a prune layer >= 0 (there is no layer -1)")
        stages = self.prune_stage_layers()
        if stages[:1] != ((prune_layer,) if prune_layer is not None else ()):
            raise ValueError(f"{type(self).__name__}: the first prune stage must be prune_layer_index()")
        if any(later <= earlier for earlier, later in zip(stages, stages[1:])):
            raise ValueError(f"prune stages must be at increasing layers, got {list(stages)}")
        if stages and stages[-1] > num_layers - 2:
            raise ValueError(
                f"prune stage after layer {stages[-1]} is out of range: the language model has {num_layers} layers"
            )
        late_inputs = set(self.wants_inputs()) - {"hidden_states", "last_attention"}
        if len(stages) > 1 and late_inputs:
            raise ValueError(
                f"{type(self).__name__}: a method with several prune stages may ask only for hidden_states and "
                f"last_attention (available at every stage), not {sorted(late_inputs)}"
            )

    def select_tokens(self, batch: TokenBatch) -> TokenDecision:
        """Which visual tokens go past the prune layer."""
        return TokenDecision(keep_visual=batch.visual_mask.clone())

    def select_neurons(self, activations: torch.Tensor, token_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Core neurons [B, k] (sorted) of decoder layer `layer` from its prefill activations [B, T, F] over
        token_mask [B, T]."""
        raise NotImplementedError(f"{type(self).__name__} does not select neurons")

    def decode_ffn_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layers whose FFN the method computes itself while decoding (decode_ffn); their prefill runs dense, and
        the prefill of `Session.calibrate` is shown to calibrate_ffn."""
        return ()

    def needs_calibration(self) -> bool:
        """Whether the method has input-dependent state that `Session.calibrate` sets (it refuses to decode
        without it)."""
        return False

    def calibrate_ffn(self, layer: int, ffn, hidden: torch.Tensor, token_mask: torch.Tensor) -> None:
        """The FFN input hidden [B, T, H] of a decode_ffn layer in a calibration prefill (`Session.calibrate`;
        token_mask [B, T]: real tokens), from which the method sets its input-dependent state for that FFN.
        ffn: the layer's FFN parts (up, down, gate linears and act)."""

    def decode_ffn(self, layer: int, ffn, hidden: torch.Tensor) -> torch.Tensor:
        """The FFN output [B, q, H] of decode_ffn layer `layer` for tokens after the prefill, hidden [B, q, H]."""
        raise NotImplementedError(f"{type(self).__name__} does not compute FFNs")

    def select_tokens_and_neurons(
        self, batch: TokenBatch, token_mask: torch.Tensor, layer: int
    ) -> tuple[TokenDecision, torch.Tensor]:
        """Both choices at the prune layer when it is also a neuron layer (a method may share work here)."""
        return self.select_tokens(batch), self.select_neurons(batch.activations, token_mask, layer)


# ---------------------------------------------------------------------------------------------- checks


def is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_ratio(name: str, value) -> float:
    """A float in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < float(value) <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_token_budget(value, allow_adaptive: bool) -> int | float | None:
    """An int >= 1, a float in (0, 1], or (when allowed) None for the adaptive budget."""
    if value is None:
        if allow_adaptive:
            return None
        raise ValueError("token_budget must be an int >= 1 or a float in (0, 1] for this method, got None")
    if is_int(value):
        if value < 1:
            raise ValueError(f"token_budget must be >= 1 when it is a count of tokens, got {value!r}")
        return int(value)
    if isinstance(value, Real) and not isinstance(value, bool):
        if not 0 < float(value) <= 1:
            raise ValueError(f"token_budget as a fraction must be in (0, 1], got {value!r}")
        return float(value)
    raise ValueError(f"token_budget must be an int, a float or None, got {value!r}")


def check_layer_index(name: str, value) -> int:
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def check_layer_list(name: str, value) -> tuple[int, ...] | None:
    """None, or a collection of distinct non-negative ints (returned sorted)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of layer indices or None, got {value!r}")
    layers = [check_layer_index(name, layer) for layer in value]
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} has repeated layers: {list(value)!r}")
    return tuple(sorted(layers))


def check_positive_int(name: str, value) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def images_of(batch: TokenBatch):
    """Yield (row, positions) for every image of the batch: positions, a sorted LongTensor, are the image's visual
    tokens in sample `row`. For methods that decide image by image (a host loop over the images)."""
    counts = (batch.image_index.amax(dim=1) + 1).clamp(min=0).tolist()
    for row, count in enumerate(counts):
        for image in range(count):
            positions = (batch.image_index[row] == image).nonzero().squeeze(1)
            if positions.numel():
                yield row, positions


def budget_of(token_budget: int | float, size: int) -> int:
    """Tokens an image of `size` tokens keeps: an int budget (at most size), or ceil(fraction * size)."""
    if isinstance(token_budget, float):
        return max(1, min(size, ceil_ratio(size, token_budget)))
    return min(size, token_budget)
