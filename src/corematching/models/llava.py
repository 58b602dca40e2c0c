"""LLaVA-1.5 layout: a vision tower and projector in front of a Llama language model.

Supports `LlavaForConditionalGeneration` (and a bare `LlavaModel`) from transformers 5.x whose language model
is a `LlamaModel` (SwiGLU FFN, 1-D RoPE).
"""

import inspect

from torch import nn

from ..errors import UnsupportedModelError
from .base import EntryCall, FFNParts, ModelAdapter, bind_arguments


class LlavaLlamaAdapter(ModelAdapter):
    family = "llava-llama"
    classes = "LlavaForConditionalGeneration with a Llama language model"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from transformers import LlavaForConditionalGeneration, LlavaModel

        return isinstance(model, (LlavaForConditionalGeneration, LlavaModel))

    def __init__(self, model: nn.Module):
        from transformers import LlamaModel, LlavaForConditionalGeneration

        self.model = model
        self.entry_module = model.model if isinstance(model, LlavaForConditionalGeneration) else model
        self.language_model = getattr(self.entry_module, "language_model", None)
        if not isinstance(self.language_model, LlamaModel):
            found = type(self.language_model).__name__
            raise UnsupportedModelError(
                f"{type(model).__name__}: the language model is {found}, but only a Llama language model "
                "(LlamaModel) is supported for LLaVA"
            )
        config = self.entry_module.config
        text_layers = self.language_model.config.num_hidden_layers
        self.decoder_layers = list(self.language_model.layers[:text_layers])
        for index in range(len(self.decoder_layers)):
            self.ffn(index)  # raises when a layer lacks the SwiGLU parts

        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_index", None)
        if image_token_id is None:
            raise UnsupportedModelError(
                f"{type(model).__name__}: the config has neither image_token_id nor image_token_index"
            )
        self.image_token_id = int(image_token_id)

        vision = config.vision_config
        image_size, patch_size = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
        if image_size and patch_size:
            side = int(image_size) // int(patch_size)
            self.image_grid = (side, side)
            with_cls = getattr(config, "vision_feature_select_strategy", "default") == "full"
            self.tokens_per_image = side * side + int(with_cls)
        self._entry_signature = inspect.signature(self.entry_module.forward)
        self.check_attention()

    def ffn(self, layer: int) -> FFNParts:
        decoder_layer = self.decoder_layers[layer]
        mlp = getattr(decoder_layer, "mlp", None)
        missing = [name for name in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, name)]
        if missing:
            raise UnsupportedModelError(
                f"decoder layer {layer}: the FFN ({type(mlp).__name__}) has no {', '.join(missing)}"
            )
        return FFNParts(module=mlp, up=mlp.up_proj, down=mlp.down_proj, act=mlp.act_fn, gate=mlp.gate_proj)

    def read_entry_call(self, args: tuple, kwargs: dict) -> EntryCall:
        arguments = bind_arguments(self._entry_signature, args, kwargs)
        mm_outputs = arguments.get("mm_encoder_outputs") or {}
        image_inputs = arguments.get("pixel_values")
        if image_inputs is None:
            image_inputs = mm_outputs.get("image")
        return EntryCall(
            input_ids=arguments.get("input_ids"),
            inputs_embeds=arguments.get("inputs_embeds"),
            attention_mask=arguments.get("attention_mask"),
            image_inputs=image_inputs,
            cache=arguments.get("cache", arguments.get("past_key_values")),
        )
