"""Idefics3 and SmolVLM (images split into tiles plus a global view; the budget counts a whole image) against the
dense model and the oracle."""

import pytest
import torch
from family_checks import (
    check_against_oracle,
    check_batch_equals_alone,
    check_draws_per_image,
    check_keep_all_equals_dense,
    check_restored,
    generate,
    kept_per_image_run,
    method_makers,
)
from oracle import masked_reference

import corematching as cm

PRUNE_LAYER = 1
NEURON_LAYERS = [0, 2, 3]
with_budget, keep_all = method_makers(PRUNE_LAYER, NEURON_LAYERS)


def kept_per_image(record, input_ids: torch.Tensor, image_tokens: list[int]) -> list[int]:
    return kept_per_image_run(record, input_ids, IMAGE, image_tokens)

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS, NEWLINE = 0, 1, 10
IMAGE, FAKE, GLOBAL, FIRST_TAG = 150, 151, 152, 153  # <image>, <fake_token_around_image>, <global-img>, <row_1_col_1>
SUPPRESS = [IMAGE, FAKE, GLOBAL]
IMAGE_SIZE, PATCH, SCALE = 24, 4, 2
SIDE = IMAGE_SIZE // PATCH // SCALE  # each sub-image: a 3 x 3 grid of tokens
SUB_IMAGE_TOKENS = SIDE * SIDE


def build(kind: str, attn: str = "sdpa", seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    text = transformers.LlamaConfig(
        vocab_size=192, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2,
        initializer_range=0.1,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    if kind == "idefics3":
        config = transformers.Idefics3Config(
            vision_config=transformers.Idefics3VisionConfig(**vision), text_config=text, image_token_id=IMAGE,
            scale_factor=SCALE,
        )
        model_class = transformers.Idefics3ForConditionalGeneration
    else:
        config = transformers.SmolVLMConfig(
            vision_config=transformers.SmolVLMVisionConfig(**vision), text_config=text, image_token_id=IMAGE,
            scale_factor=SCALE,
        )
        model_class = transformers.SmolVLMForConditionalGeneration
    model = model_class._from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


_MODELS = {}


def model_of(kind: str = "idefics3", attn: str = "sdpa"):
    if (kind, attn) not in _MODELS:
        _MODELS[kind, attn] = build(kind, attn)
    return _MODELS[kind, attn]


def image_tokens(tiles: tuple[int, int] | None) -> list[int]:
    """An image as the processor writes it: rows x cols tiles (each after its row/column tag, a newline after
    each row) then the global view; or the global view alone (tiles None)."""
    sub_image = [IMAGE] * SUB_IMAGE_TOKENS
    tokens = []
    if tiles is not None:
        rows, cols = tiles
        for row in range(rows):
            for col in range(cols):
                tokens += [FAKE, FIRST_TAG + row * 6 + col, *sub_image]
            tokens.append(NEWLINE)
        tokens.append(NEWLINE)
    return tokens + [FAKE, GLOBAL, *sub_image, FAKE]


def sample(images: list[tuple[int, int] | None], text_before: int, text_after: int, seed: int):
    """(input_ids 1-D, pixel values [sub-images, 3, H, W]) of one prompt."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [BOS, *torch.randint(11, 100, (text_before,), generator=generator).tolist()]
    for tiles in images:
        tokens += image_tokens(tiles) + torch.randint(11, 100, (2,), generator=generator).tolist()
    tokens += torch.randint(11, 100, (text_after,), generator=generator).tolist()
    sub_images = sum(1 + (tiles[0] * tiles[1] if tiles else 0) for tiles in images)
    pixels = torch.randn(sub_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return torch.tensor(tokens), pixels


def batch(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Left-padded input_ids and attention_mask; pixel values [B, most sub-images, 3, H, W] padded with the
    all-zero images the model skips."""
    width = max(len(ids) for ids, _ in samples)
    most = max(len(pixels) for _, pixels in samples)
    input_ids = torch.full((len(samples), width), PAD)
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    pixel_values = torch.zeros(len(samples), most, 3, IMAGE_SIZE, IMAGE_SIZE)
    for row, (ids, pixels) in enumerate(samples):
        input_ids[row, width - len(ids) :] = ids
        attention_mask[row, width - len(ids) :] = 1
        pixel_values[row, : len(pixels)] = pixels
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


TWO_IMAGES = sample([(2, 2), None], text_before=3, text_after=4, seed=1)  # 5 sub-images (45 tokens), then 1 (9)


@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
def test_keep_all_equals_dense(kind):
    check_keep_all_equals_dense(model_of(kind), batch([TWO_IMAGES]), SUPPRESS, keep_all())


def test_an_image_is_all_its_sub_images():
    model = model_of()
    inputs = batch([TWO_IMAGES])
    with cm.sparsify(model, with_budget(2)) as session:
        adapter = session.adapter
        call = adapter.read_entry_call((), inputs)
        layout = adapter.image_layout(call, adapter.visual_mask(call))
    visual = inputs["input_ids"][0] == IMAGE
    assert adapter.sub_images(call) == [5, 1]
    assert layout.image_index[0][visual].tolist() == [0] * 45 + [1] * 9
    assert layout.image_ordinal[0][visual].tolist() == list(range(45)) + list(range(9))
    assert layout.sub_image_index[0][visual].tolist() == [k for k in range(5) for _ in range(9)] + [0] * 9
    assert layout.sub_image_ordinal[0][visual].tolist() == list(range(9)) * 6
    assert set(layout.grid_rows[0][visual].tolist()) == {SIDE} == set(layout.grid_cols[0][visual].tolist())
    assert (layout.image_index[0][~visual] == -1).all()
    embedded = {"inputs_embeds": model.get_input_embeddings()(inputs["input_ids"]), "pixel_values": True}
    assert adapter.sub_images(adapter.read_entry_call((), embedded)) == [5, 1]  # tags compared as embeddings


def test_a_prompt_without_images_runs_dense():
    model = model_of()
    ids, _ = sample([], text_before=6, text_after=3, seed=4)
    inputs = {"input_ids": ids.unsqueeze(0), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    check_keep_all_equals_dense(model, inputs, SUPPRESS, with_budget(0.25))


@pytest.mark.parametrize(
    "kind,attn,budget,kept",
    [("idefics3", "sdpa", 0.25, [12, 3]), ("idefics3", "eager", 2, [2, 2]), ("smolvlm", "sdpa", 2, [2, 2])],
)
def test_each_image_keeps_its_budget_and_decoding_equals_the_oracle(kind, attn, budget, kept):
    model = model_of(kind, attn)
    inputs = batch([TWO_IMAGES])
    record = check_against_oracle(model, model.model.text_model, inputs, SUPPRESS, with_budget(budget), attn)
    assert kept_per_image(record, inputs["input_ids"], [45, 9]) == kept


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
def test_core_neuron_decoding_equals_the_oracle(kind, cache):
    model = model_of(kind)
    inputs = batch([TWO_IMAGES])
    record = check_against_oracle(model, model.model.text_model, inputs, SUPPRESS, with_budget(0.25, True),
                                  cache_implementation=cache)
    assert sorted(record.core_neurons) == NEURON_LAYERS
    assert kept_per_image(record, inputs["input_ids"], [45, 9]) == [12, 3]


def test_a_batch_of_different_sizes_equals_each_sample_alone():
    first = sample([(1, 2)], text_before=2, text_after=3, seed=2)  # 3 sub-images
    second = sample([None, (2, 1)], text_before=6, text_after=2, seed=3)  # 1 + 3 sub-images, a longer prompt
    alone = [batch([first]), batch([second])]
    check_batch_equals_alone(model_of(), batch([first, second]), alone, SUPPRESS, with_budget(0.25, True))



def test_random_tokens_draw_from_each_image_s_own_pixels():
    """On a forward with pixel values, RandomTokens seeds each image's draw with a hash of that image's pixels (all
    its sub-images): images of one layout but different pixels draw differently, and a batch mate that pads the
    pixel values changes nothing."""
    model = model_of()
    method = cm.RandomTokens(token_budget=0.25, prune_layer=PRUNE_LAYER)
    alike = sample([(1, 1), (1, 1)], text_before=2, text_after=2, seed=7)  # two images, 18 tokens each
    bigger = sample([(2, 2)], text_before=1, text_after=1, seed=8)  # a batch mate with more sub-images
    check_draws_per_image(model, method, batch([alike]), batch([bigger, alike]), tokens_per_image=18)



def test_methods_ranking_by_the_vision_tower_attention_are_refused():
    with pytest.raises(cm.UnsupportedModelError, match="the vision tower's attention are not supported"):
        cm.sparsify(model_of(), cm.VisionZip(dominant=2, contextual=1))


def test_the_model_is_restored_after_the_block_and_after_an_exception():
    check_restored(model_of(), batch([TWO_IMAGES]), SUPPRESS, with_budget(0.25, True))


def test_a_second_turn_with_a_new_image_is_exact():
    """A new image in a later call (a continued conversation): its images are read among the new tokens."""
    model = model_of()
    first_ids, first_pixels = sample([None], text_before=2, text_after=3, seed=5)
    second_ids, second_pixels = sample([(1, 2)], text_before=0, text_after=3, seed=6)
    second_ids = second_ids[1:]  # no BOS in a later turn
    length = len(first_ids) + len(second_ids)
    logits = []
    with cm.sparsify(model, with_budget(2)) as session, torch.no_grad():
        out = model(**batch([(first_ids, first_pixels)]), use_cache=True)
        first = session.last
        mask = torch.ones(1, length, dtype=torch.long)
        out = model(input_ids=second_ids[None], pixel_values=second_pixels[None], attention_mask=mask, cache=out.cache)
        second = session.last
        for _ in range(3):
            logits.append(out.logits[0, -1])
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, attention_mask=mask, cache=out.cache)
    assert kept_per_image(second, second_ids[None], [27]) == [2]  # the three sub-images are one image
    removed = torch.zeros(1, length + 3, dtype=torch.bool)
    removed[:, : len(first_ids)] = first.visual_mask & ~first.keep_mask
    removed[:, len(first_ids) : length] = second.visual_mask & ~second.keep_mask
    full = batch([(torch.cat([first_ids, second_ids]), torch.cat([first_pixels, second_pixels]))])
    with masked_reference(model.model.text_model, {}, removed, PRUNE_LAYER):
        _, expected = generate(model, full, SUPPRESS, steps=3)
    torch.testing.assert_close(torch.stack(logits), expected[0], atol=1e-5, rtol=0)
