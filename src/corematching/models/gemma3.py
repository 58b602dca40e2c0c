"""Gemma 3: a SigLIP vision tower pooled to `mm_tokens_per_image` tokens per image (a square grid) in front of a
Gemma 3 language model (GeGLU FFN with gelu_pytorch_tanh; sliding-window and global layers with their own rotary
bases).

- Visual tokens are the `image_token_id` placeholders, `mm_tokens_per_image` per image (pan-and-scan crops are
  images of their own); the processor frames each image with `boi` / `eoi` tokens, which are text (always kept).
- Masks: each layer type has its own mask. When the call passes `token_type_ids` (the processor does, and
  generate() passes them to the prefill), the tokens of an image attend to each other both ways; transformers
  composes sliding window AND (causal OR image block), and the layers after the prune layer are masked the same
  way among the kept tokens. Without `token_type_ids` every layer is causal, as in the dense model. A later turn
  over a filled cache passes them for the whole sequence (the model reads them by position); its new images'
  blocks are rebuilt among its kept tokens.
- Positions are 1-D; the position embeddings of each layer type are gathered at the kept tokens.
"""

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModeError, UnsupportedModelError
from .base import AttentionRule, EntryCall, bind_arguments
from .decoder_lm import DecoderLanguageModelAdapter
from .llava import image_token_id_of, read_llava_call


@dataclass
class Gemma3EntryCall(EntryCall):
    images_bidirectional: bool = False  # the call passes token_type_ids: its images attend both ways


class Gemma3Adapter(DecoderLanguageModelAdapter):
    family = "gemma3"
    classes = "Gemma3ForConditionalGeneration"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from transformers import Gemma3ForConditionalGeneration, Gemma3Model

        return isinstance(model, (Gemma3ForConditionalGeneration, Gemma3Model))

    def __init__(self, model: nn.Module):
        from transformers import Gemma3ForConditionalGeneration

        self.model = model
        self.entry_module = model.model if isinstance(model, Gemma3ForConditionalGeneration) else model
        self.attach_language_model(getattr(self.entry_module, "language_model", None), ("Gemma3TextModel",))
        config = self.entry_module.config
        self.image_token_id = image_token_id_of(model, config)
        self.tokens_per_image = int(config.mm_tokens_per_image)
        side = int(round(self.tokens_per_image**0.5))
        self.image_grid = (side, side) if side * side == self.tokens_per_image else None
        self._entry_signature = inspect.signature(self.entry_module.forward)
        self.check_attention()

    def read_entry_call(self, args: tuple, kwargs: dict) -> EntryCall:
        token_type_ids = bind_arguments(self._entry_signature, args, kwargs).get("token_type_ids")
        read = read_llava_call(self._entry_signature, args, kwargs)
        call = Gemma3EntryCall(**vars(read), images_bidirectional=token_type_ids is not None)
        if token_type_ids is not None and call.image_inputs is not None:
            past = int(call.cache.get_seq_length()) if call.cache is not None else 0
            if past:  # a later turn: the model reads token_type_ids by position, from the start of the sequence
                if token_type_ids.shape[1] != past + call.length:
                    raise UnsupportedModeError(
                        f"Gemma 3: a later turn with images passes token_type_ids of {token_type_ids.shape[1]} "
                        f"tokens over a cache of {past}; the model reads them by position from the start of the "
                        f"sequence, so they must cover all {past + call.length} tokens (as generate() passes them)"
                    )
                token_type_ids = token_type_ids[:, past:]
            if call.input_ids is not None:
                self._check_image_blocks(call, token_type_ids)
        return call

    def _check_image_blocks(self, call: EntryCall, token_type_ids: torch.Tensor) -> None:
        """The model's bidirectional blocks are the runs of token_type_ids == 1; the layers after the prune layer
        use the image placeholders, `tokens_per_image` per image. Refuse inputs where the two differ."""
        marked = token_type_ids.to(call.input_ids.device) == 1
        placeholders = call.input_ids == self.image_token_id
        starts = marked & ~torch.nn.functional.pad(marked, (1, 0))[:, :-1]
        runs, images = torch.stack([starts.sum(), placeholders.sum()]).tolist()
        if not torch.equal(marked, placeholders) or runs * self.tokens_per_image != images:
            raise UnsupportedModeError(
                "token_type_ids that do not mark exactly the image tokens, one run of "
                f"{self.tokens_per_image} per image (as the Gemma 3 processor builds them, with boi/eoi between "
                "images): the layers after the prune layer could not reproduce the model's image blocks"
            )

    def attention_rule(self, layer: int, call: EntryCall | None = None) -> AttentionRule:
        rule = super().attention_rule(layer)
        bidirectional = bool(getattr(call, "images_bidirectional", False))
        return AttentionRule(sliding_window=rule.sliding_window, bidirectional_images=bidirectional)

    def vision_attention_module(self) -> nn.Module:
        raise UnsupportedModelError(
            "Gemma 3: the vision tower attends over its patches, which the projector average-pools into fewer "
            "image tokens; methods that rank image tokens by the vision tower's attention are not supported"
        )
