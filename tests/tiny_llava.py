"""Tiny random LLaVA models (CLIP vision tower, Llama language model) built from configs, seeded, fp32, in eval
mode; and prompts for them."""

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 120
PAD, BOS = 0, 1
IMAGE_SIZE, PATCH = 24, 4  # a 6 x 6 grid: 36 visual tokens per image
GRID = IMAGE_SIZE // PATCH
VISUAL_TOKENS = GRID * GRID


def build_tiny_llava(
    attn: str = "sdpa", num_layers: int = 4, seed: int = 0, mlp_bias: bool = False
) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=2,
        initializer_range=0.1,
        mlp_bias=mlp_bias,  # larger than the default so that random logits are well separated
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    model.generation_config.pad_token_id = PAD
    return model.eval()


def build_prompt(text_before: int, text_after: int, seed: int) -> torch.Tensor:
    """[BOS, text..., <image> x 36, text...] as a 1-D LongTensor."""
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(3, 100, (text_before,), generator=generator)
    after = torch.randint(3, 100, (text_after,), generator=generator)
    image = torch.full((VISUAL_TOKENS,), IMAGE_TOKEN)
    return torch.cat([torch.tensor([BOS]), before, image, after])


def build_pixels(num_images: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 1-D prompts with left padding: (input_ids [B, T], attention_mask [B, T])."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask
