"""Gemma 3 (GeGLU FFN, sliding-window and global layers with their own rotary bases, images attended to both ways
in prefill) against the dense model and the oracle, with prompts longer than the sliding window."""

import pytest
import torch
from family_checks import (
    check_against_oracle,
    check_batch_equals_alone,
    check_keep_all_equals_dense,
    check_restored,
    generate,
    kept_per_image,
    method_makers,
)
from oracle import masked_reference, removed_mask

import corematching as cm

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS, EOS = 0, 2, 1
BOI, EOI, IMAGE = 118, 119, 120
SUPPRESS = [BOI, EOI, IMAGE]
IMAGE_SIZE, PATCH = 32, 4  # 8 x 8 patches pooled to a 4 x 4 grid: 16 tokens per image
TOKENS_PER_IMAGE = 16
WINDOW = 6  # shorter than an image: a sliding layer sees only part of it
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
PRUNE_LAYER = 0  # layers 1 (sliding), 2 (global) and 3 (sliding) run on the kept tokens
NEURON_LAYERS = [0, 2, 3]
with_budget, keep_all = method_makers(PRUNE_LAYER, NEURON_LAYERS)


def build(attn: str = "sdpa", seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )
    text = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, layer_types=LAYER_TYPES,
        max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.1,
    )
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE,
    )
    model = transformers.Gemma3ForConditionalGeneration._from_config(config, attn_implementation=attn,
                                                                      dtype=torch.float32)
    with torch.no_grad():  # the projection starts at zero: random features make the images matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


_MODELS = {}


def model_of(attn: str = "sdpa"):
    if attn not in _MODELS:
        _MODELS[attn] = build(attn)
    return _MODELS[attn]


def sample(num_images: int, text_before: int, text_after: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([BOS, text, (BOI, IMAGE x 16, EOI, text) per image, text], pixel values [num_images, 3, 32, 32])."""
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.tensor([BOS]), torch.randint(3, 100, (text_before,), generator=generator)]
    for _ in range(num_images):
        parts += [torch.tensor([BOI]), torch.full((TOKENS_PER_IMAGE,), IMAGE), torch.tensor([EOI])]
        parts.append(torch.randint(3, 100, (2,), generator=generator))
    parts.append(torch.randint(3, 100, (text_after,), generator=generator))
    pixels = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return torch.cat(parts), pixels


def batch(samples: list, token_types: bool = True) -> dict:
    """Left-padded inputs; token_type_ids mark the image tokens, as the processor does."""
    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), PAD)
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, (ids, _) in enumerate(samples):
        input_ids[row, width - len(ids) :] = ids
        attention_mask[row, width - len(ids) :] = 1
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  pixel_values=torch.cat([pixels for _, pixels in samples]))
    if token_types:
        inputs["token_type_ids"] = (input_ids == IMAGE).long()
    return inputs


TWO_IMAGES = sample(2, text_before=3, text_after=5, seed=1)  # 49 tokens: many sliding windows long


def test_keep_all_equals_dense():
    check_keep_all_equals_dense(model_of(), batch([TWO_IMAGES]), SUPPRESS, keep_all())


@pytest.mark.parametrize("attn,budget,kept", [("sdpa", 0.25, [4, 4]), ("eager", 3, [3, 3])])
def test_each_image_keeps_its_budget_and_decoding_equals_the_oracle(attn, budget, kept):
    model = model_of(attn)
    inputs = batch([TWO_IMAGES])
    record = check_against_oracle(model, model.model.language_model, inputs, SUPPRESS, with_budget(budget), attn,
                                  steps=8)
    with cm.sparsify(model, with_budget(budget)) as session:
        call = session.adapter.read_entry_call((), inputs)
        layout = session.adapter.image_layout(call, session.adapter.visual_mask(call))
    assert kept_per_image(record, layout) == kept
    ids = inputs["input_ids"][0]
    assert record.keep_mask[0][(ids == BOI) | (ids == EOI)].all()  # boi / eoi are text


def test_without_token_types_images_are_causal_and_equal_the_oracle():
    model = model_of()
    inputs = batch([TWO_IMAGES], token_types=False)
    check_against_oracle(model, model.model.language_model, inputs, SUPPRESS, with_budget(0.25))


def test_the_oracle_sees_the_bidirectional_image_blocks():
    """The model's masks differ with and without token_type_ids, so the two oracle tests above check different
    masks."""
    model = model_of()
    with torch.no_grad():
        bidirectional = model(**batch([TWO_IMAGES])).logits
        causal = model(**batch([TWO_IMAGES], token_types=False)).logits
    assert not torch.allclose(bidirectional, causal, atol=1e-3)


def test_core_neuron_decoding_equals_the_oracle():
    model = model_of()
    record = check_against_oracle(model, model.model.language_model, batch([TWO_IMAGES]), SUPPRESS,
                                  with_budget(0.25, True), steps=8)
    assert sorted(record.core_neurons) == NEURON_LAYERS


def test_a_batch_of_different_sizes_equals_each_sample_alone():
    first = sample(1, text_before=2, text_after=3, seed=2)
    second = sample(2, text_before=6, text_after=2, seed=3)
    alone = [batch([first]), batch([second])]
    check_batch_equals_alone(model_of(), batch([first, second]), alone, SUPPRESS, with_budget(0.25, True))


def test_beam_search_with_sliding_window_caches_equals_the_oracle():
    """Beam search reorders the caches, sliding-window layers included, and their kept-token state with them."""
    model = model_of()
    inputs = batch([sample(1, text_before=2, text_after=3, seed=2), sample(2, text_before=6, text_after=2, seed=3)])
    options = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=False, suppress_tokens=SUPPRESS)
    with cm.sparsify(model, with_budget(0.25, True)) as session:
        tokens = model.generate(**inputs, **options)
        record = session.last
    length = inputs["input_ids"].shape[1]
    language_model = model.model.language_model
    ffns = {layer: language_model.layers[layer].mlp for layer in record.neurons}
    removed = removed_mask(record.keep_mask, record.visual_mask, length + 8)
    with masked_reference(language_model, ffns, removed, PRUNE_LAYER, record.core_neurons_per_sample, length):
        expected = model.generate(**inputs, **options)
    assert torch.equal(tokens, expected)


def test_token_types_that_are_not_the_image_tokens_are_refused():
    inputs = batch([TWO_IMAGES])
    inputs["token_type_ids"] = torch.zeros_like(inputs["token_type_ids"])
    with cm.sparsify(model_of(), with_budget(4)), pytest.raises(cm.UnsupportedModeError, match="token_type_ids"):
        model_of()(**inputs)


def test_the_model_is_restored_after_the_block_and_after_an_exception():
    check_restored(model_of(), batch([TWO_IMAGES]), SUPPRESS, with_budget(0.25, True))


def image_types(input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == IMAGE).long()


def test_a_later_turn_with_a_new_image_equals_the_oracle():
    """A second turn brings a new image over the first turn's sparsified cache, with token_type_ids for the whole
    sequence (the model reads them by position): its image is pruned too and attends to itself both ways after
    the prune layer (with the image blocks made causal there, the logits differ by 0.19), and it runs on the first
    prefill's core neurons like every later call."""
    model = model_of()
    first_ids, first_pixels = sample(1, text_before=3, text_after=2, seed=1)
    second_ids, second_pixels = sample(1, text_before=1, text_after=3, seed=6)
    second_ids = second_ids[1:]  # no BOS
    full_ids = torch.cat([first_ids, second_ids]).unsqueeze(0)
    full_mask = torch.ones_like(full_ids)
    steps = 4
    with cm.sparsify(model, with_budget(4, True)) as session, torch.no_grad():
        out = model(input_ids=first_ids.unsqueeze(0), pixel_values=first_pixels,
                    token_type_ids=image_types(first_ids.unsqueeze(0)), use_cache=True)
        first = session.last
        out = model(input_ids=second_ids.unsqueeze(0), pixel_values=second_pixels, token_type_ids=image_types(full_ids),
                    attention_mask=full_mask, cache=out.cache, use_cache=True)
        second = session.last
        cache, mask, collected = out.cache, full_mask, []
        for _ in range(steps):
            logits = out.logits[:, -1]
            collected.append(logits[0])
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            out = model(input_ids=logits.argmax(-1, keepdim=True), attention_mask=mask, cache=cache, use_cache=True)
    assert len(second.kept_visual_positions[0]) == 4  # the new image's tokens were chosen too
    length = full_ids.shape[1]
    removed = removed_mask(first.keep_mask, first.visual_mask, length + steps)
    removed[:, len(first_ids) : length] |= second.visual_mask & ~second.keep_mask
    language_model = model.model.language_model
    ffns = {layer: language_model.layers[layer].mlp for layer in first.neurons}
    inputs = dict(input_ids=full_ids, attention_mask=full_mask, pixel_values=torch.cat([first_pixels, second_pixels]),
                  token_type_ids=image_types(full_ids))
    # every call after the first prefill continues its decisions: the core neurons from the second turn on
    with masked_reference(language_model, ffns, removed, PRUNE_LAYER, first.core_neurons_per_sample, len(first_ids)):
        _, expected = generate(model, inputs, SUPPRESS, steps)
    torch.testing.assert_close(torch.stack(collected), expected[0], atol=1e-5, rtol=0)


def test_a_later_turn_with_token_types_of_its_own_tokens_only_is_refused():
    """Over a filled cache the model reads token_type_ids by position from the start of the sequence: those of the
    new tokens alone would put its image blocks in the wrong place."""
    model = model_of()
    inputs = batch([TWO_IMAGES])
    with cm.sparsify(model, with_budget(4)):
        cache = model(**inputs, use_cache=True).cache
        turn = batch([sample(1, text_before=1, text_after=2, seed=6)])
        turn["attention_mask"] = torch.cat([inputs["attention_mask"], turn["attention_mask"]], dim=1)
        with pytest.raises(cm.UnsupportedModeError, match="must cover all"):
            model(**turn, cache=cache)


@pytest.mark.parametrize("token_types", [True, False])
def test_a_static_cache_equals_the_oracle(token_types):
    """Static caches give the sliding layers static sliding-window caches: the 49-token prompt overflows their
    6-slot buffers, which then roll at every step; the masks generate() would build over the kept-token caches are
    left to the model and the session."""
    model = model_of()
    check_against_oracle(model, model.model.language_model, batch([TWO_IMAGES], token_types), SUPPRESS,
                         with_budget(0.25, True), steps=8, cache_implementation="static")


def test_a_batch_with_a_static_cache_equals_each_sample_alone():
    first = sample(1, text_before=2, text_after=3, seed=2)
    second = sample(2, text_before=6, text_after=2, seed=3)
    alone = [batch([first]), batch([second])]
    check_batch_equals_alone(model_of(), batch([first, second]), alone, SUPPRESS, with_budget(0.25, True),
                             cache_implementation="static")


def test_masks_per_layer_type_built_over_the_kept_token_cache_are_refused():
    """One 4-D mask per layer type built outside the model from a static cache whose global layers hold only the
    kept tokens: its columns are cache slots, not positions."""
    from transformers import StaticCache
    from transformers.masking_utils import create_masks_for_generate

    model = model_of()
    inputs = batch([TWO_IMAGES], token_types=False)
    length = inputs["input_ids"].shape[1]
    with cm.sparsify(model, with_budget(4)):
        cache = StaticCache(config=model.config, max_cache_len=length + 4)
        logits = model(**inputs, cache=cache, use_cache=True).logits
        padding = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
        masks = create_masks_for_generate(config=model.config.get_text_config(), inputs_embeds=torch.empty(1, 1, 0),
                                          attention_mask=padding, cache=cache,
                                          position_ids=torch.tensor([[length]]))
        assert isinstance(masks, dict)
        with pytest.raises(cm.UnsupportedModeError, match="cache slots"):
            model(input_ids=logits[:, -1:].argmax(-1), attention_mask=masks, cache=cache,
                  position_ids=torch.tensor([[length]]))


def test_methods_ranking_by_the_vision_tower_attention_are_refused():
    with pytest.raises(cm.UnsupportedModelError, match="the vision tower's attention are not supported"):
        cm.sparsify(model_of(), cm.VisionZip(dominant=2, contextual=1))


def test_the_adapter_keeps_no_state_of_a_call():
    """Whether images attend both ways is a property of each call (its token_type_ids), read from the call itself:
    reading another call in between changes neither the adapter nor the first call's rule."""
    from corematching.models import adapter_for

    adapter = adapter_for(model_of())
    before = dict(vars(adapter))
    with_types = adapter.read_entry_call((), batch([TWO_IMAGES]))
    without_types = adapter.read_entry_call((), batch([TWO_IMAGES], token_types=False))
    global_layer = LAYER_TYPES.index("full_attention")
    assert adapter.attention_rule(global_layer, with_types).bidirectional_images
    assert not adapter.attention_rule(global_layer, without_types).bidirectional_images
    assert vars(adapter).keys() == before.keys()
    assert all(vars(adapter)[name] is value for name, value in before.items())
