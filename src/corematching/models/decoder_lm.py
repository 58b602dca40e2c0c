"""What the supported decoder language models share: a stack of `layers`, each with a gated FFN
(`mlp.gate_proj` / `up_proj` / `down_proj` / `act_fn`: SwiGLU in Llama, Mistral and Qwen, GeGLU in Gemma 3),
1-D RoPE positions, and attention that is causal, optionally within a sliding window.

Which layers slide is read from the language model's config the way its modeling code reads it: `layer_types`
("sliding_attention" / "full_attention") when the config has them (Qwen2, Qwen3, Gemma 3), otherwise every layer
slides when `sliding_window` is set (Mistral).
"""

from torch import nn

from ..errors import UnsupportedModelError
from .base import AttentionRule, EntryCall, FFNParts, ModelAdapter, gated_mlp_parts

# Decoder language models whose layers have the gated FFN and the masks described above, by class name.
LANGUAGE_MODELS = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model", "Gemma3TextModel")


def language_model_classes(names: tuple[str, ...] = LANGUAGE_MODELS) -> tuple[type, ...]:
    import transformers

    return tuple(getattr(transformers, name) for name in names)


def check_language_model(owner: nn.Module, language_model, names: tuple[str, ...]) -> None:
    """Raise UnsupportedModelError unless language_model is one of the classes `names`."""
    if not isinstance(language_model, language_model_classes(names)):
        found = type(language_model).__name__ if language_model is not None else "missing"
        raise UnsupportedModelError(
            f"{type(owner).__name__}: the language model is {found}, but only {', '.join(names)} are supported "
            "inside it (decoders with a gated FFN and 1-D rotary positions)"
        )


def sliding_window_of(config, layer: int) -> int | None:
    """The sliding window of decoder layer `layer` (None: it attends to every earlier token)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer] == "sliding_attention" else None
    return window


class DecoderLanguageModelAdapter(ModelAdapter):
    """Base of adapters whose language model is one of LANGUAGE_MODELS: decoder layers, FFN parts and attention
    rules come from it. Subclasses call `attach_language_model` in __init__."""

    def attach_language_model(self, language_model, names: tuple[str, ...] = LANGUAGE_MODELS) -> None:
        check_language_model(self.model, language_model, names)
        config = language_model.config
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: the language model attends bidirectionally "
                "(use_bidirectional_attention); only causal decoders are supported"
            )
        self.language_model = language_model
        self.decoder_layers = list(language_model.layers[: config.num_hidden_layers])
        for index in range(len(self.decoder_layers)):
            self.ffn(index)  # raises when a layer lacks the gated FFN parts

    def ffn(self, layer: int) -> FFNParts:
        return gated_mlp_parts(self.decoder_layers[layer], layer)

    def attention_rule(self, layer: int, call: EntryCall | None = None) -> AttentionRule:
        return AttentionRule(sliding_window=sliding_window_of(self.language_model.config, layer))
