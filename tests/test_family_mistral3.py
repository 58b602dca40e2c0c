"""Mistral 3 (Pixtral images at their own sizes, rows delimited by [IMG_BREAK] / [IMG_END]; Mistral decoders with
and without a sliding window, and Ministral 3 whose attention scales queries by position) against the dense model
and the oracle."""

import pytest
import torch
from family_checks import (
    check_against_oracle,
    check_batch_equals_alone,
    check_keep_all_equals_dense,
    check_restored,
    kept_per_image_run,
    method_makers,
)

import corematching as cm

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS = 0, 1
IMAGE, BREAK, END = 150, 151, 152  # [IMG], [IMG_BREAK], [IMG_END]
SUPPRESS = [IMAGE, BREAK, END]
PATCH, MERGE = 4, 2
PIXELS_PER_TOKEN = PATCH * MERGE
MAX_SIZE = 40
WINDOW = 16  # shorter than the prompts, so that the sliding window matters
PRUNE_LAYER = 1
NEURON_LAYERS = [0, 2, 3]
with_budget, keep_all = method_makers(PRUNE_LAYER, NEURON_LAYERS)


def build(decoder: str, attn: str = "sdpa", seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    text = dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=2, initializer_range=0.1,
    )
    if decoder == "ministral3":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                "llama_4_scaling_beta": 0.5}
        text_config = transformers.Ministral3Config(**text, rope_parameters=rope)
    else:
        window = WINDOW if decoder == "mistral-sliding" else None
        text_config = transformers.MistralConfig(**text, sliding_window=window)
    vision = transformers.PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
        image_size=MAX_SIZE, patch_size=PATCH,
    )
    config = transformers.Mistral3Config(
        vision_config=vision, text_config=text_config, image_token_index=IMAGE, spatial_merge_size=MERGE
    )
    model = transformers.Mistral3ForConditionalGeneration._from_config(
        config, attn_implementation=attn, dtype=torch.float32
    )
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


_MODELS = {}


def model_of(decoder: str = "mistral", attn: str = "sdpa"):
    if (decoder, attn) not in _MODELS:
        _MODELS[decoder, attn] = build(decoder, attn)
    return _MODELS[decoder, attn]


def image_tokens(height: int, width: int) -> list[int]:
    """An image as the processor writes it: each row of [IMG] tokens ends with [IMG_BREAK], the last with
    [IMG_END]."""
    rows, cols = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    tokens = []
    for row in range(rows):
        tokens += [IMAGE] * cols + [END if row == rows - 1 else BREAK]
    return tokens


def sample(sizes: list[tuple[int, int]], text_before: int, text_after: int, seed: int):
    """(input_ids 1-D, [pixel values [3, h, w] per image], sizes)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [BOS, *torch.randint(3, 100, (text_before,), generator=generator).tolist()]
    for height, width in sizes:
        tokens += image_tokens(height, width) + torch.randint(3, 100, (2,), generator=generator).tolist()
    tokens += torch.randint(3, 100, (text_after,), generator=generator).tolist()
    pixels = [torch.randn(3, height, width, generator=generator) for height, width in sizes]
    return torch.tensor(tokens), pixels, sizes


def batch(samples: list) -> dict:
    """Left-padded input_ids and attention_mask; every image of the batch padded to the largest, with
    image_sizes giving each one's own size."""
    width = max(len(ids) for ids, _, _ in samples)
    input_ids = torch.full((len(samples), width), PAD)
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, (ids, _, _) in enumerate(samples):
        input_ids[row, width - len(ids) :] = ids
        attention_mask[row, width - len(ids) :] = 1
    images = [(pixels, size) for _, all_pixels, sizes in samples for pixels, size in zip(all_pixels, sizes)]
    if not images:
        return dict(input_ids=input_ids, attention_mask=attention_mask)
    pixel_values = torch.zeros(len(images), 3, max(s[0] for _, s in images), max(s[1] for _, s in images))
    for index, (pixels, (height, width)) in enumerate(images):
        pixel_values[index, :, :height, :width] = pixels
    image_sizes = torch.tensor([size for _, size in images])
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_sizes=image_sizes)


TWO_IMAGES = sample([(16, 24), (24, 32)], text_before=3, text_after=4, seed=1)  # 2 x 3 and 3 x 4 tokens


def kept_per_image(record, input_ids: torch.Tensor, image_tokens: list[int]) -> list[int]:
    return kept_per_image_run(record, input_ids, IMAGE, image_tokens)


@pytest.mark.parametrize("decoder", ["mistral", "mistral-sliding", "ministral3"])
def test_keep_all_equals_dense(decoder):
    check_keep_all_equals_dense(model_of(decoder), batch([TWO_IMAGES]), SUPPRESS, keep_all())


def test_each_image_has_its_own_grid_and_break_tokens_are_text():
    inputs = batch([TWO_IMAGES])
    with cm.sparsify(model_of(), with_budget(2)) as session:
        adapter = session.adapter
        call = adapter.read_entry_call((), inputs)
        visual = adapter.visual_mask(call)
        layout = adapter.image_layout(call, visual)
    ids = inputs["input_ids"][0]
    assert torch.equal(visual[0], ids == IMAGE)  # [IMG_BREAK] and [IMG_END] are not visual
    image = ids == IMAGE
    assert layout.image_index[0][image].tolist() == [0] * 6 + [1] * 12
    assert layout.image_ordinal[0][image].tolist() == list(range(6)) + list(range(12))
    assert layout.grid_rows[0][image].tolist() == [2] * 6 + [3] * 12
    assert layout.grid_cols[0][image].tolist() == [3] * 6 + [4] * 12
    # as generate calls it: the images encoded first, image_sizes kept back; the grids come from the rows
    with torch.no_grad():
        encoded = model_of().model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    pre_encoded = {"input_ids": inputs["input_ids"], "mm_encoder_outputs": {"image": encoded}}
    call = adapter.read_entry_call((), pre_encoded)
    again = adapter.image_layout(call, adapter.visual_mask(call))
    for name in ("image_index", "image_ordinal", "grid_rows", "grid_cols"):
        assert torch.equal(getattr(again, name), getattr(layout, name)), name


@pytest.mark.parametrize(
    "decoder,attn,budget,kept",
    [
        ("mistral", "sdpa", 0.25, [2, 3]),
        ("mistral", "eager", 2, [2, 2]),
        ("mistral-sliding", "sdpa", 0.25, [2, 3]),
        ("mistral-sliding", "eager", 3, [3, 3]),
        ("ministral3", "sdpa", 0.25, [2, 3]),
    ],
)
def test_each_image_keeps_its_budget_and_decoding_equals_the_oracle(decoder, attn, budget, kept):
    model = model_of(decoder, attn)
    inputs = batch([TWO_IMAGES])
    record = check_against_oracle(model, model.model.language_model, inputs, SUPPRESS, with_budget(budget), attn)
    assert kept_per_image(record, inputs["input_ids"], [6, 12]) == kept
    kept_ids = inputs["input_ids"][0][record.kept_positions[0]]
    assert (kept_ids == BREAK).sum() == 3 and (kept_ids == END).sum() == 2  # row delimiters always stay


@pytest.mark.parametrize("decoder", ["mistral", "mistral-sliding"])
def test_core_neuron_decoding_equals_the_oracle(decoder):
    model = model_of(decoder)
    inputs = batch([TWO_IMAGES])
    record = check_against_oracle(model, model.model.language_model, inputs, SUPPRESS, with_budget(0.25, True))
    assert sorted(record.core_neurons) == NEURON_LAYERS


@pytest.mark.parametrize("decoder", ["mistral", "mistral-sliding"])
def test_a_static_cache_equals_the_oracle(decoder):
    """With the sliding window, every layer's static cache is a rolling window buffer over the kept tokens."""
    model = model_of(decoder)
    check_against_oracle(model, model.model.language_model, batch([TWO_IMAGES]), SUPPRESS, with_budget(0.25, True),
                         steps=8, cache_implementation="static")


@pytest.mark.parametrize("decoder", ["mistral", "mistral-sliding"])
def test_a_batch_of_different_sizes_equals_each_sample_alone(decoder):
    first = sample([(32, 16)], text_before=2, text_after=3, seed=2)  # 4 x 2 tokens
    second = sample([(8, 40), (24, 24)], text_before=6, text_after=2, seed=3)  # 1 x 5 and 3 x 3, a longer prompt
    alone = [batch([first]), batch([second])]
    check_batch_equals_alone(model_of(decoder), batch([first, second]), alone, SUPPRESS, with_budget(0.25, True))



def test_a_batch_with_a_sample_without_images_equals_each_sample_alone():
    text_only = sample([], text_before=7, text_after=2, seed=9)
    alone = [batch([TWO_IMAGES]), batch([text_only])]
    check_batch_equals_alone(model_of(), batch([TWO_IMAGES, text_only]), alone, SUPPRESS, with_budget(0.25, True))



@pytest.mark.parametrize("decoder", ["mistral", "mistral-sliding"])
def test_random_tokens_draw_from_each_image_cropped_to_its_size(decoder):
    """RandomTokens seeds each image's draw with a hash of its pixels: at the image's own size, so the padding the
    batch's largest image imposes never changes a sample's tokens."""
    method = cm.RandomTokens(token_budget=0.25, prune_layer=PRUNE_LAYER)
    first = sample([(32, 16)], text_before=2, text_after=3, seed=2)
    second = sample([(8, 40), (24, 24)], text_before=6, text_after=2, seed=3)
    alone = [batch([first]), batch([second])]
    check_batch_equals_alone(model_of(decoder), batch([first, second]), alone, SUPPRESS, method)
    same_size = batch([sample([(24, 24), (24, 24)], text_before=2, text_after=2, seed=7)])
    with cm.sparsify(model_of(decoder), method) as session:
        model_of(decoder).generate(**same_size, max_new_tokens=1, do_sample=False, suppress_tokens=SUPPRESS)
        kept = session.last.keep_mask[0][same_size["input_ids"][0] == IMAGE]
    assert not torch.equal(kept[:9], kept[9:])  # different pixels, different draws


def test_a_prompt_without_images_runs_dense():
    ids = sample([], text_before=6, text_after=3, seed=4)[0]
    inputs = {"input_ids": ids.unsqueeze(0), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    check_keep_all_equals_dense(model_of(), inputs, SUPPRESS, with_budget(0.25))



def test_methods_ranking_by_the_vision_tower_attention_are_refused():
    with pytest.raises(cm.UnsupportedModelError, match="the vision tower's attention are not supported"):
        cm.sparsify(model_of(), cm.VisionZip(dominant=2, contextual=1))


def test_the_model_is_restored_after_the_block_and_after_an_exception():
    check_restored(model_of("mistral-sliding"), batch([TWO_IMAGES]), SUPPRESS, with_budget(0.25, True))
