"""Plain decoder language models, text only: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
`Qwen3ForCausalLM`, `Gemma3ForCausalLM`, and their bare decoders (`LlamaModel`, ..., `Gemma3TextModel`: the
language model inside a VLM of the supported families).

They have no visual tokens, so only the neuron half of a method applies: a method that also applies to text
(CoreInfer) chooses the core neurons from the prompt's prefill and decodes with them. A method that removes
tokens is refused at `sparsify` (there is nothing for it to remove).
"""

import inspect

from torch import nn

from ..errors import UnsupportedModelError
from .base import EntryCall, bind_arguments, entry_call_from
from .decoder_lm import LANGUAGE_MODELS, DecoderLanguageModelAdapter, language_model_classes

CAUSAL_LMS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM")


class CausalLMAdapter(DecoderLanguageModelAdapter):
    family = "causal-lm"
    classes = ", ".join(CAUSAL_LMS + LANGUAGE_MODELS) + " (text only: core-neuron decoding)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, language_model_classes(CAUSAL_LMS + LANGUAGE_MODELS))

    def __init__(self, model: nn.Module):
        self.model = model
        is_decoder = isinstance(model, language_model_classes(LANGUAGE_MODELS))
        self.entry_module = model if is_decoder else model.model
        self.attach_language_model(self.entry_module)
        self._entry_signature = inspect.signature(self.entry_module.forward)
        self.check_attention()

    def check_prune_layer(self, prune_layer: int | None) -> None:
        if prune_layer is not None:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} is a text-only model: it has no visual tokens for a token-pruning "
                "method to remove; use a neuron-only method (cm.CoreInfer) for core-neuron decoding, or a "
                "vision-language model"
            )

    def visual_token_ids(self) -> tuple[int, ...]:
        return ()

    def read_entry_call(self, args: tuple, kwargs: dict) -> EntryCall:
        return entry_call_from(bind_arguments(self._entry_signature, args, kwargs), None)
