"""InternVL (an image is one run of tiles; the budget counts the whole run) against the dense model and the
oracle."""

import pytest
import torch
from family_checks import (
    check_against_oracle,
    check_batch_equals_alone,
    check_draws_per_image,
    check_keep_all_equals_dense,
    check_restored,
    kept_per_image_run,
    method_makers,
)

import corematching as cm

PRUNE_LAYER = 1
NEURON_LAYERS = [0, 2, 3]
with_budget, keep_all = method_makers(PRUNE_LAYER, NEURON_LAYERS)


def kept_per_image(record, input_ids: torch.Tensor, image_tokens: list[int]) -> list[int]:
    return kept_per_image_run(record, input_ids, IMAGE, image_tokens)

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS = 0, 1
IMAGE, IMG_START, IMG_END = 150, 151, 152  # <IMG_CONTEXT>, <img>, </img>
SUPPRESS = [IMAGE, IMG_START, IMG_END]
IMAGE_SIZE, PATCH = 24, 4
SIDE = IMAGE_SIZE // PATCH // 2  # downsample ratio 0.5: each tile is a 3 x 3 grid of tokens
TILE_TOKENS = SIDE * SIDE


def build(attn: str = "sdpa", seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    text = transformers.Qwen2Config(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2,
        initializer_range=0.1,
    )
    vision = transformers.InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    config = transformers.InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=TILE_TOKENS
    )
    model = transformers.InternVLForConditionalGeneration._from_config(
        config, attn_implementation=attn, dtype=torch.float32
    )
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


_MODELS = {}


def model_of(attn: str = "sdpa"):
    if attn not in _MODELS:
        _MODELS[attn] = build(attn)
    return _MODELS[attn]


def sample(tiles_per_image: list[int], text_before: int, text_after: int, seed: int):
    """(input_ids 1-D, pixel values [tiles, 3, H, W]): each image `<img>`, its tiles' tokens, `</img>`."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [BOS, *torch.randint(3, 100, (text_before,), generator=generator).tolist()]
    for tiles in tiles_per_image:
        tokens += [IMG_START, *[IMAGE] * (tiles * TILE_TOKENS), IMG_END]
        tokens += torch.randint(3, 100, (2,), generator=generator).tolist()
    tokens += torch.randint(3, 100, (text_after,), generator=generator).tolist()
    pixels = torch.randn(sum(tiles_per_image), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return torch.tensor(tokens), pixels


def batch(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Left-padded input_ids and attention_mask; the tiles of all samples in order."""
    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), PAD)
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, (ids, _) in enumerate(samples):
        input_ids[row, width - len(ids) :] = ids
        attention_mask[row, width - len(ids) :] = 1
    pixel_values = torch.cat([pixels for _, pixels in samples])
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


TWO_IMAGES = sample([3, 1], text_before=3, text_after=4, seed=1)  # 3 tiles (27 tokens), then 1 tile (9)


def test_keep_all_equals_dense():
    check_keep_all_equals_dense(model_of(), batch([TWO_IMAGES]), SUPPRESS, keep_all())


def test_an_image_is_all_its_tiles():
    inputs = batch([TWO_IMAGES])
    with cm.sparsify(model_of(), with_budget(2)) as session:
        adapter = session.adapter
        call = adapter.read_entry_call((), inputs)
        layout = adapter.image_layout(call, adapter.visual_mask(call))
    visual = inputs["input_ids"][0] == IMAGE
    assert adapter.sub_images(call) == [3, 1]
    assert layout.image_index[0][visual].tolist() == [0] * 27 + [1] * 9
    assert layout.image_ordinal[0][visual].tolist() == list(range(27)) + list(range(9))
    assert layout.sub_image_index[0][visual].tolist() == [k for k in range(3) for _ in range(9)] + [0] * 9
    assert layout.sub_image_ordinal[0][visual].tolist() == list(range(9)) * 4
    assert set(layout.grid_rows[0][visual].tolist()) == {SIDE} == set(layout.grid_cols[0][visual].tolist())


@pytest.mark.parametrize("attn,budget,kept", [("sdpa", 0.25, [7, 3]), ("eager", 2, [2, 2])])
def test_each_image_keeps_its_budget_and_decoding_equals_the_oracle(attn, budget, kept):
    model = model_of(attn)
    inputs = batch([TWO_IMAGES])
    record = check_against_oracle(model, model.model.language_model, inputs, SUPPRESS, with_budget(budget), attn)
    assert kept_per_image(record, inputs["input_ids"], [27, 9]) == kept


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_core_neuron_decoding_equals_the_oracle(cache):
    model = model_of()
    inputs = batch([TWO_IMAGES])
    record = check_against_oracle(model, model.model.language_model, inputs, SUPPRESS, with_budget(0.25, True),
                                  cache_implementation=cache)
    assert sorted(record.core_neurons) == NEURON_LAYERS
    assert kept_per_image(record, inputs["input_ids"], [27, 9]) == [7, 3]


def test_a_batch_of_different_sizes_equals_each_sample_alone():
    first = sample([2], text_before=2, text_after=3, seed=2)
    second = sample([1, 3], text_before=5, text_after=2, seed=3)
    alone = [batch([first]), batch([second])]
    check_batch_equals_alone(model_of(), batch([first, second]), alone, SUPPRESS, with_budget(0.25, True))


def test_a_prompt_without_images_runs_dense():
    ids = sample([], text_before=6, text_after=3, seed=4)[0]
    inputs = {"input_ids": ids.unsqueeze(0), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    check_keep_all_equals_dense(model_of(), inputs, SUPPRESS, with_budget(0.25))



def test_random_tokens_draw_from_each_image_s_own_pixels():
    """On a forward with pixel values, RandomTokens seeds each image's draw with a hash of that image's pixels (all
    its sub-images): images of one layout but different pixels draw differently, and a batch mate that pads the
    pixel values changes nothing."""
    model = model_of()
    method = cm.RandomTokens(token_budget=0.25, prune_layer=PRUNE_LAYER)
    alike = sample([2, 2], text_before=2, text_after=2, seed=7)  # two images, 18 tokens each
    bigger = sample([3], text_before=1, text_after=1, seed=8)  # a batch mate with more sub-images
    check_draws_per_image(model, method, batch([alike]), batch([bigger, alike]), tokens_per_image=18)



def test_methods_ranking_by_the_vision_tower_attention_are_refused():
    with pytest.raises(cm.UnsupportedModelError, match="the vision tower's attention are not supported"):
        cm.sparsify(model_of(), cm.VisionZip(dominant=2, contextual=1))


def test_the_model_is_restored_after_the_block_and_after_an_exception():
    check_restored(model_of(), batch([TWO_IMAGES]), SUPPRESS, with_budget(0.25, True))
