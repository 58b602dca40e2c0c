"""Checkpoints with each family's real geometry and preprocessing, built offline: the real checkpoint's vision
geometry (image size, patch size, tiles, pooling, merge) and its processor (the family's own image processor class
with the real settings, a tokenizer with the family's special tokens, a chat template of the family's shape), but
tiny widths and depths and random weights. `save(family, folder)` writes one with `save_pretrained`, so that
`cm.load_model(folder)` and `--model folder` load it as they load a downloaded checkpoint.

The tokenizer is byte-level with no merges (every byte one token, ~260 ids plus the special tokens), so that any
text encodes and decodes; the special tokens are the family's own strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------------------------- tokenizer


def byte_tokenizer(specials: list[str], named: dict[str, str] | None = None, bos: str | None = None,
                   eos: str = "</s>", pad: str = "<pad>", chat_template: str | None = None):
    """A byte-level tokenizer: the 256 byte symbols, then `specials` (each one token); `named` gives named special
    tokens (e.g. {"image_token": "<image>"}) that processors read as tokenizer attributes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    core = tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    named = dict(named or {})
    ordered = list(dict.fromkeys([pad, eos] + ([bos] if bos else []) + specials + list(named.values())))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=named or None,
        chat_template=chat_template,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ordered}, replace_extra_special_tokens=False)
    return tokenizer


def token_id(tokenizer, token: str) -> int:
    index = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(index, int) and index >= 0, token
    return index


# ----------------------------------------------------------------------------------------------- tiny parts


TEXT_LAYERS = 3  # the default prune layer (1) plus two layers after it


def llama_text(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=TEXT_LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id, initializer_range=0.2, **extra)


def mistral_text(tokenizer):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=8192, sliding_window=None, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         initializer_range=0.2)


def qwen2_text(tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=TEXT_LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id, initializer_range=0.2)


def clip_tower(image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=patch_size, projection_dim=32)


def siglip_tower(image_size: int, patch_size: int):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size)


def finish(model, tokenizer):
    """Random weights, seeded; generation ends on the tokenizer's end token (random weights rarely produce it)."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


# ----------------------------------------------------------------------------------------------- chat templates


def plain_template(user: str, image: str, assistant: str, end: str = "", image_after: str = "") -> str:
    """A chat template that writes each user turn as `user` + its parts (an image as `image` + `image_after`, text
    as itself) + `end`, and opens the assistant's turn with `assistant`."""
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}" + user
        + "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image + image_after
        + "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}" + end
        + "{% else %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )


# ----------------------------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    name: str
    real: str  # the real checkpoint whose geometry and preprocessing this one has
    model_class: str  # the class AutoModelForImageTextToText loads it as
    build: object  # () -> (model, processor)


def llava_1_5():
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (24 x 24 = 576 tokens), feature layer -2, CLS dropped;
    CLIP preprocessing (resize the shorter side to 336, centre crop 336)."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    template = plain_template("USER: ", "<image>", " ASSISTANT:", image_after="\n")
    tokenizer = byte_tokenizer(["<image>"], bos="<s>", chat_template=template)
    config = LlavaConfig(vision_config=clip_tower(336, 14), text_config=llama_text(tokenizer),
                         image_token_index=token_id(tokenizer, "<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=576)
    torch.manual_seed(0)
    model = finish(LlavaForConditionalGeneration(config), tokenizer)
    images = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                   do_center_crop=True, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    return model, processor


NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_next():
    """llava-hf/llava-v1.6-mistral-7b-hf: CLIP ViT-L/14 at 336 px, anyres with the 672 px pinpoints (a base view
    and up to 2 x 2 tiles of 576 tokens, unpadded, a newline token per row), Mistral language model."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    template = plain_template("[INST] ", "<image>", " [/INST]", image_after="\n")
    tokenizer = byte_tokenizer(["<image>"], bos="<s>", chat_template=template)
    config = LlavaNextConfig(vision_config=clip_tower(336, 14), text_config=mistral_text(tokenizer),
                             image_token_index=token_id(tokenizer, "<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=NEXT_PINPOINTS,
                             image_seq_length=576)
    torch.manual_seed(0)
    model = finish(LlavaNextForConditionalGeneration(config), tokenizer)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                        image_grid_pinpoints=NEXT_PINPOINTS, image_mean=CLIP_MEAN,
                                        image_std=CLIP_STD, do_pad=True)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=template)
    return model, processor


def gemma3():
    """google/gemma-3-4b-it: SigLIP at 896 px, patch 14 (64 x 64 patches) pooled to 256 tokens (16 x 16) per
    image, pan-and-scan off; each image framed by <start_of_image> / <end_of_image>; Gemma 3 language model with
    sliding-window and global layers."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
    )

    template = plain_template("<start_of_turn>user\n", "<start_of_image>", "<start_of_turn>model\n",
                              end="<end_of_turn>\n")
    template = "{{ bos_token }}" + template
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = byte_tokenizer(["<start_of_turn>", "<end_of_turn>"], named=named, bos="<bos>", eos="<eos>",
                               chat_template=template)
    text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            query_pre_attn_scalar=8, sliding_window=512,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            initializer_range=0.2)
    config = Gemma3Config(text_config=text, vision_config=siglip_tower(896, 14), mm_tokens_per_image=256,
                          boi_token_index=token_id(tokenizer, "<start_of_image>"),
                          eoi_token_index=token_id(tokenizer, "<end_of_image>"),
                          image_token_index=token_id(tokenizer, "<image_soft_token>"))
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # the projection starts at zero: random features make the images matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    model = finish(model, tokenizer)
    images = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, image_mean=HALF, image_std=HALF,
                                     do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=256,
                                chat_template=template)
    return model, processor


def idefics3():
    """HuggingFaceM4/Idefics3-8B-Llama3: SigLIP tiles of 364 px, patch 14 (26 x 26), pixel shuffle by 2 to 169
    tokens; the picture resized to a longest edge of 4 x 364 and split into up to 4 x 4 tiles plus a global view;
    tiles framed by <fake_token_around_image> and <row_r_col_c>, the global view by <global-img>."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    template = plain_template("<|begin_of_text|>User:", "<image>", "Assistant:", end="<end_of_utterance>\n")
    places = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer = byte_tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                                "<|begin_of_text|>"] + places, eos="<end_of_utterance>", chat_template=template)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=364, patch_size=14)
    config = Idefics3Config(vision_config=vision, text_config=llama_text(tokenizer),
                            image_token_id=token_id(tokenizer, "<image>"), scale_factor=2)
    torch.manual_seed(0)
    model = finish(Idefics3ForConditionalGeneration(config), tokenizer)
    images = Idefics3ImageProcessorPil(size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364},
                                       do_image_splitting=True, image_mean=HALF, image_std=HALF)
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=169,
                                  chat_template=template)
    return model, processor


def internvl():
    """OpenGVLab/InternVL3-1B-hf: InternViT at 448 px tiles, patch 14 (32 x 32), pixel shuffle 0.5 to 256 tokens
    per tile; up to 12 tiles by the picture's aspect ratio plus a thumbnail when there are several; each image
    framed by <img> / </img>; Qwen2 language model."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
    )

    template = plain_template("<|im_start|>user\n", "<IMG_CONTEXT>", "<|im_start|>assistant\n",
                              end="<|im_end|>\n", image_after="\n")
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tokenizer = byte_tokenizer(["<|im_start|>", "<|im_end|>"], named=named, eos="<|im_end|>",
                               chat_template=template)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=[448, 448], patch_size=[14, 14])
    config = InternVLConfig(vision_config=vision, text_config=qwen2_text(tokenizer),
                            image_token_id=token_id(tokenizer, "<IMG_CONTEXT>"), downsample_ratio=0.5,
                            vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = finish(InternVLForConditionalGeneration(config), tokenizer)
    images = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                      max_patches=12, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    processor = with_videos_if_possible(InternVLProcessor, "InternVLVideoProcessor", image_processor=images,
                                        tokenizer=tokenizer, image_seq_length=256, chat_template=template)
    return model, processor


ONEVISION_PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]


def llava_onevision():
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP at 384 px, patch 14 (27 x 27 = 729 tokens), anyres over
    384 px tiles up to 2304 px, anyres_max_9, all tokens kept (strategy "full"), Qwen2 language model."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    template = plain_template("<|im_start|>user\n", "<image>", "<|im_start|>assistant\n", end="<|im_end|>\n",
                              image_after="\n")
    tokenizer = byte_tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
                               chat_template=template)
    config = LlavaOnevisionConfig(vision_config=siglip_tower(384, 14), text_config=qwen2_text(tokenizer),
                                  image_token_index=token_id(tokenizer, "<image>"),
                                  video_token_index=token_id(tokenizer, "<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                  image_grid_pinpoints=ONEVISION_PINPOINTS)
    torch.manual_seed(0)
    model = finish(LlavaOnevisionForConditionalGeneration(config), tokenizer)
    images = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                             image_grid_pinpoints=ONEVISION_PINPOINTS, image_mean=HALF,
                                             image_std=HALF, do_pad=True)
    processor = with_videos_if_possible(LlavaOnevisionProcessor, "LlavaOnevisionVideoProcessor",
                                        image_processor=images, tokenizer=tokenizer, num_image_tokens=729,
                                        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                        chat_template=template)
    return model, processor


QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = plain_template("<|im_start|>user\n", "<|vision_start|><|image_pad|><|vision_end|>",
                               "<|im_start|>assistant\n", end="<|im_end|>\n")


def qwen_vl(version: str):
    """Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct: native resolution, patch 14, temporal patch 2,
    2 x 2 merge (one token per 28 x 28 pixels), min_pixels 56 x 56, max_pixels 12845056; M-RoPE."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = byte_tokenizer(QWEN_TOKENS, eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN_TEMPLATE)
    ids = {name: token_id(tokenizer, token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=TEXT_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                initializer_range=0.2)
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3, mlp_ratio=2)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model = transformers.Qwen2VLForConditionalGeneration(config)
    else:
        vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                      fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    model = finish(model, tokenizer)
    images = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                      merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor_class = transformers.Qwen2VLProcessor if version == "2" else transformers.Qwen2_5_VLProcessor
    processor = with_videos_if_possible(processor_class, "Qwen2VLVideoProcessor", image_processor=images,
                                        tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    return model, processor


def qwen3_vl():
    """Qwen/Qwen3-VL-2B-Instruct: native resolution, patch 16, temporal patch 2, 2 x 2 merge (one token per 32 x 32
    pixels) between 65536 and 16777216 pixels, learned position embeddings (48 x 48) interpolated to the grid;
    DeepStack features from three vision layers added after the first three decoder layers; interleaved M-RoPE."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = byte_tokenizer(QWEN_TOKENS, eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN_TEMPLATE)
    ids = {name: token_id(tokenizer, token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=TEXT_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 5000000.0,
                                 "mrope_interleaved": True},
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                initializer_range=0.2)
    vision = dict(depth=3, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=2304,
                  deepstack_visual_indexes=[0, 1, 2])
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(0)
    model = finish(transformers.Qwen3VLForConditionalGeneration(config), tokenizer)
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
                                      temporal_patch_size=2, merge_size=2, image_mean=HALF, image_std=HALF)
    processor = with_videos_if_possible(transformers.Qwen3VLProcessor, "Qwen3VLVideoProcessor", image_processor=images,
                                        tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    return model, processor


def mistral3():
    """mistralai/Mistral-Small-3.1-24B-Instruct-2503: Pixtral at native resolution up to a longest edge of 1540 px,
    patch 14, 2 x 2 merge; an [IMG_BREAK] token after each row of tokens and [IMG_END] after the image."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessorPil,
        PixtralVisionConfig,
    )

    from corematching.processors import real_processor_class

    PixtralProcessor = real_processor_class("PixtralProcessor")  # transformers' own: a placeholder sans torchvision

    template = "{{ bos_token }}" + plain_template("[INST]", "[IMG]", "", end="[/INST]")
    tokenizer = byte_tokenizer(["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"], bos="<s>",
                               chat_template=template)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=16, image_size=1540, patch_size=14)
    config = Mistral3Config(vision_config=vision, text_config=mistral_text(tokenizer),
                            image_token_index=token_id(tokenizer, "[IMG]"), spatial_merge_size=2,
                            vision_feature_layer=-1)
    torch.manual_seed(0)
    model = finish(Mistral3ForConditionalGeneration(config), tokenizer)
    images = PixtralImageProcessorPil(size={"longest_edge": 1540}, patch_size={"height": 14, "width": 14},
                                      image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = PixtralProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, spatial_merge_size=2,
                                 chat_template=template)
    return model, processor


def smolvlm():
    """HuggingFaceTB/SmolVLM-256M-Instruct: SigLIP tiles of 512 px, patch 16 (32 x 32), pixel shuffle by 4 to 64
    tokens; the picture resized to a longest edge of 2048 px and split into 512 px tiles plus a global view."""
    import transformers

    template = plain_template("<|im_start|>User:", "<image>", "Assistant:", end="<end_of_utterance>\n")
    places = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer = byte_tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                                "<|im_start|>"] + places, eos="<end_of_utterance>", chat_template=template)
    vision = transformers.SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=512, patch_size=16)
    config = transformers.SmolVLMConfig(vision_config=vision, text_config=llama_text(tokenizer),
                                        image_token_id=token_id(tokenizer, "<image>"), scale_factor=4)
    torch.manual_seed(0)
    model = finish(transformers.SmolVLMForConditionalGeneration(config), tokenizer)
    images = transformers.SmolVLMImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512},
                                                   do_image_splitting=True, image_mean=HALF, image_std=HALF)
    processor = with_videos_if_possible(transformers.SmolVLMProcessor, "SmolVLMVideoProcessor",
                                        image_processor=images, tokenizer=tokenizer, image_seq_len=64,
                                        chat_template=template)
    return model, processor


FAMILIES = {
    family.name: family
    for family in (
        Family("llava-1.5", "llava-hf/llava-1.5-7b-hf", "LlavaForConditionalGeneration", llava_1_5),
        Family("llava-next", "llava-hf/llava-v1.6-mistral-7b-hf", "LlavaNextForConditionalGeneration", llava_next),
        Family("gemma3", "google/gemma-3-4b-it", "Gemma3ForConditionalGeneration", gemma3),
        Family("idefics3", "HuggingFaceM4/Idefics3-8B-Llama3", "Idefics3ForConditionalGeneration", idefics3),
        Family("internvl", "OpenGVLab/InternVL3-1B-hf", "InternVLForConditionalGeneration", internvl),
        Family("llava-onevision", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "LlavaOnevisionForConditionalGeneration",
               llava_onevision),
        Family("qwen2-vl", "Qwen/Qwen2-VL-2B-Instruct", "Qwen2VLForConditionalGeneration", lambda: qwen_vl("2")),
        Family("qwen2.5-vl", "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen2_5_VLForConditionalGeneration",
               lambda: qwen_vl("2.5")),
        Family("qwen3-vl", "Qwen/Qwen3-VL-2B-Instruct", "Qwen3VLForConditionalGeneration", qwen3_vl),
        Family("mistral3", "mistralai/Mistral-Small-3.1-24B-Instruct-2503", "Mistral3ForConditionalGeneration",
               mistral3),
        Family("smolvlm", "HuggingFaceTB/SmolVLM-256M-Instruct", "SmolVLMForConditionalGeneration", smolvlm),
    )
}


def torchvision_missing() -> str | None:
    """Why torchvision cannot be used here (video processors need it), or None when it can."""
    from corematching.processors import torchvision_missing

    return torchvision_missing()


def with_videos_if_possible(processor_class, video_processor_class: str, **arguments):
    """The processor with the family's video processor, or, when torchvision is missing (transformers' video
    processors need it), the same processor class with images only, as `cm.load_model` builds it."""
    import transformers

    from corematching.processors import images_only

    if torchvision_missing():
        return images_only(processor_class)(video_processor=None, **arguments)
    return processor_class(video_processor=getattr(transformers, video_processor_class)(), **arguments)


def save(name: str, folder: Path) -> Path:
    """Build the family's checkpoint and save model and processor into `folder` (created)."""
    model, processor = FAMILIES[name].build()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
