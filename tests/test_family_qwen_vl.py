"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (M-RoPE, per-image grids, videos, DeepStack) against the oracle."""

import pytest
import torch
from family_checks import check_restored
from oracle import masked_reference, removed_mask

import corematching as cm

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE, VIDEO, START, END = 150, 151, 152, 153
PAD = 0
STEPS = 3
ATOL = 1e-5
PATCH, TEMPORAL, MERGE = 2, 2, 2
PATCH_VALUES = 3 * TEMPORAL * PATCH * PATCH  # one flattened patch


def text_config(num_layers: int = 4) -> dict:
    return dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        pad_token_id=PAD,
        eos_token_id=2,
        bos_token_id=1,
        initializer_range=0.1,
    )


def build(kind: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    if kind == "qwen2":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
                      temporal_patch_size=TEMPORAL, in_channels=3, mlp_ratio=2)
        config = transformers.Qwen2VLConfig(text_config=text_config(), vision_config=vision, **ids)
        model_class = transformers.Qwen2VLForConditionalGeneration
    elif kind == "qwen2.5":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3,
                      window_size=8, fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(text_config=text_config(), vision_config=vision, **ids)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:  # "qwen3": DeepStack features into decoder layers 0 and 1; "qwen3-deep": 0, 1 and 2 (as the real ones)
        deepstack = [0, 1, 2] if kind == "qwen3-deep" else [0, 1]
        vision = dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3,
                      num_position_embeddings=64, deepstack_visual_indexes=deepstack)
        text = text_config()
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                  "rope_theta": 10000.0, "mrope_interleaved": True})
        config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        model_class = transformers.Qwen3VLForConditionalGeneration
    model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


_MODELS = {}


def model_of(kind: str):
    if kind not in _MODELS:
        _MODELS[kind] = build(kind)
    return _MODELS[kind]


def prompt(images: list[tuple[int, int]], text_before: int, text_after: int, seed: int, video: tuple | None = None):
    """(input_ids 1-D, pixel values, image_grid_thw, extras): images given as (h, w) in patches."""
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.tensor([1]), torch.randint(3, 100, (text_before,), generator=generator)]
    pixels, grids = [], []
    for h, w in images:
        parts += [torch.tensor([START]), torch.full((h * w // MERGE**2,), IMAGE), torch.tensor([END])]
        pixels.append(torch.randn(h * w, PATCH_VALUES, generator=generator))
        grids.append([1, h, w])
    extras = {}
    if video is not None:
        t, h, w = video
        parts += [torch.tensor([START]), torch.full((t * h * w // MERGE**2,), VIDEO), torch.tensor([END])]
        extras["pixel_values_videos"] = torch.randn(TEMPORAL * t * h * w // TEMPORAL, PATCH_VALUES, generator=generator)
        extras["video_grid_thw"] = torch.tensor([[t, h, w]])
    parts.append(torch.randint(3, 100, (text_after,), generator=generator))
    return torch.cat(parts), torch.cat(pixels) if pixels else None, torch.tensor(grids) if grids else None, extras


def inputs_of(ids, pixels, grids, extras, pad_to: int | None = None):
    length = len(ids)
    pad = (pad_to or length) - length
    input_ids = torch.cat([torch.full((pad,), PAD), ids]).unsqueeze(0)
    mask = torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(length, dtype=torch.long)]).unsqueeze(0)
    token_types = ((input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()).int()
    inputs = dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=token_types, **extras)
    if pixels is not None:
        inputs.update(pixel_values=pixels, image_grid_thw=grids)
    return inputs


def generate(model, inputs, steps=STEPS, **options):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, suppress_tokens=[IMAGE, VIDEO, START, END], **options)
    return out.sequences, torch.stack(out.logits, dim=1)


def oracle(model, record, length: int):
    language_model = model.model.language_model
    ffns = {layer: language_model.layers[layer].mlp for layer in record.neurons}
    removed = removed_mask(record.keep_mask, record.visual_mask, length + STEPS)
    return masked_reference(
        language_model, ffns, removed, record.prune_layer, record.core_neurons_per_sample, length
    )


def assert_pruned(record) -> None:
    """Tokens really were removed: every sample with images kept some of its visual tokens, not all."""
    kept = (record.keep_mask & record.visual_mask).sum(1)
    visual = record.visual_mask.sum(1)
    with_images = visual > 0
    assert with_images.any()
    assert bool((kept[with_images] > 0).all()) and bool((kept[with_images] < visual[with_images]).all()), (kept, visual)


def check_against_oracle(model, inputs, method, **options):
    """options: more generate() arguments for the sparsified run (the oracle runs with a dynamic cache). The
    method must remove visual tokens (checked)."""
    with cm.sparsify(model, method) as session:
        tokens, logits = generate(model, inputs, **options)
        record = session.last
    assert_pruned(record)
    with oracle(model, record, inputs["input_ids"].shape[1]):
        expected_tokens, expected_logits = generate(model, inputs)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    return record


TWO_IMAGES = prompt([(4, 6), (6, 8)], 3, 5, seed=1)  # 6 and 12 visual tokens


@pytest.mark.parametrize("kind", ["qwen2", "qwen2.5", "qwen3"])
def test_keep_all_equals_dense(kind):
    model = model_of(kind)
    inputs = inputs_of(*TWO_IMAGES)
    dense_tokens, dense_logits = generate(model, inputs)
    method = cm.CoreMatching(prune_layer=1, token_budget=1.0, beta=1.0, neuron_layers=[1, 2, 3])
    with cm.sparsify(model, method):
        tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2.5", "qwen3"])
def test_each_image_keeps_its_budget_and_decoding_equals_the_oracle(kind):
    model = model_of(kind)
    inputs = inputs_of(*TWO_IMAGES)
    record = check_against_oracle(model, inputs, cm.CoreMatching(prune_layer=1, token_budget=0.25, beta=0.5))
    visual = (inputs["input_ids"][0] == IMAGE).nonzero().flatten()
    kept = record.kept_visual_positions[0]
    assert int(torch.isin(kept, visual[:6]).sum()) == 2  # ceil(0.25 * 6)
    assert int(torch.isin(kept, visual[6:]).sum()) == 3  # ceil(0.25 * 12)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2.5", "qwen3"])
def test_a_static_cache_equals_the_oracle(kind):
    method = cm.CoreMatching(prune_layer=1, token_budget=0.25, beta=0.5, neuron_layers=[1, 2, 3])
    check_against_oracle(model_of(kind), inputs_of(*TWO_IMAGES), method, cache_implementation="static")


def test_core_neuron_decoding_equals_the_oracle():
    model = model_of("qwen2")
    method = cm.CoreMatching(prune_layer=1, token_budget=2, beta=0.5, neuron_layers=[0, 2, 3])
    record = check_against_oracle(model, inputs_of(*TWO_IMAGES), method)
    assert sorted(record.core_neurons) == [0, 2, 3]


def test_a_video_is_pruned_as_one_image_and_equals_the_oracle():
    model = model_of("qwen2")
    ids, pixels, grids, extras = prompt([(4, 4)], 2, 4, seed=3, video=(2, 4, 6))  # 4 image + 12 video tokens
    inputs = inputs_of(ids, pixels, grids, extras)
    record = check_against_oracle(model, inputs, cm.UniformTokens(token_budget=0.5, prune_layer=1))
    kept = record.kept_visual_positions[0]
    video = (inputs["input_ids"][0] == VIDEO).nonzero().flatten()
    assert int(torch.isin(kept, video).sum()) == 6


def test_batch_of_different_image_sizes_equals_each_alone():
    model = model_of("qwen2")
    first = prompt([(4, 6)], 2, 3, seed=4)
    second = prompt([(6, 8), (4, 4)], 4, 6, seed=5)
    width = max(len(first[0]), len(second[0]))
    batch = inputs_of(torch.cat([torch.full((width - len(first[0]),), PAD), first[0]]), None, None, {})
    mask = torch.stack([(torch.arange(width) >= width - len(p[0])).long() for p in (first, second)])
    ids = torch.stack([batch["input_ids"][0], second[0]])
    batch = dict(
        input_ids=ids,
        attention_mask=mask,
        mm_token_type_ids=((ids == IMAGE).long()).int(),
        pixel_values=torch.cat([first[1], second[1]]),
        image_grid_thw=torch.cat([first[2], second[2]]),
    )
    method = cm.CoreMatching(prune_layer=1, token_budget=0.5, beta=0.5, neuron_layers=[2, 3])
    with cm.sparsify(model, method) as session:
        tokens, logits = generate(model, batch)
        kept_in_batch = session.last.kept_positions
        assert_pruned(session.last)
        for row, sample in enumerate((first, second)):
            alone_tokens, alone_logits = generate(model, inputs_of(*sample))
            offset = width - len(sample[0])
            assert torch.equal(tokens[row, offset:], alone_tokens[0])
            torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-4, rtol=0)
            assert torch.equal(kept_in_batch[row] - offset, session.last.kept_positions[0])


@pytest.mark.parametrize("method", [
    cm.CoreMatching(prune_layer=0, token_budget=0.25, beta=0.5, neuron_layers=[2]),
    cm.DivPrune(prune_layer=-1, token_budget=0.5),
], ids=["after-layer-0", "before-layer-0"])
def test_qwen3_deepstack_features_reach_the_kept_tokens_only(method):
    """Tokens removed before the last DeepStack layer (features into layers 0 and 1): the kept visual tokens get
    their own features, as in the oracle."""
    record = check_against_oracle(model_of("qwen3"), inputs_of(*TWO_IMAGES), method)
    assert record.prune_layer == method.prune_layer


def test_qwen3_runs_the_default_corematching():
    """The default prune layer (1) comes before the last DeepStack layer (2) of a Qwen3-VL with three levels."""
    model = model_of("qwen3-deep")
    method = cm.CoreMatching()
    assert method.prune_layer < 2
    record = check_against_oracle(model, inputs_of(*TWO_IMAGES), method)
    assert record.prune_layer == method.prune_layer


def test_the_model_is_restored_after_an_exception():
    model = model_of("qwen2")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=2, neuron_layers=[2])):
            generate(model, inputs_of(*TWO_IMAGES))
            raise RuntimeError("inside")
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    assert all("forward" not in vars(module) for module in model.modules())
    assert not any(module._forward_pre_hooks for module in model.modules())


@pytest.mark.parametrize("kind", ["qwen2.5", "qwen3"])
def test_the_model_is_restored_with_its_generation_and_deepstack_methods(kind):
    """The session wraps generate()'s position preparation (and Qwen3-VL's DeepStack step): all put back."""
    method = cm.CoreMatching(prune_layer=0, token_budget=0.5, beta=0.5, neuron_layers=[2])
    check_restored(model_of(kind), inputs_of(*TWO_IMAGES), [IMAGE, VIDEO, START, END], method)
