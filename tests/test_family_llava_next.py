"""LLaVA-NeXT and LLaVA-OneVision (anyres tiles with newline tokens, token counts that differ per image, OneVision
videos) against the dense model and the oracle. Token counts and newline positions come from the model's own
image features."""

import math

import pytest
import torch
from family_checks import (
    check_against_oracle,
    check_batch_equals_alone,
    check_keep_all_equals_dense,
    check_restored,
    kept_per_image,
    method_makers,
)
from oracle import masked_reference, removed_mask

import corematching as cm

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS = 0, 1
IMAGE, VIDEO = 120, 121
SUPPRESS = [IMAGE, VIDEO]
TILE, PATCH = 12, 4  # a 3 x 3 grid per base view and per tile
PINPOINTS = [[12, 24], [24, 12], [24, 24]]
PRUNE_LAYER = 1
NEURON_LAYERS = [0, 2, 3]
with_budget, keep_all = method_makers(PRUNE_LAYER, NEURON_LAYERS)


def build(kind: str, attn: str = "sdpa", seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS,
                eos_token_id=2, initializer_range=0.1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=TILE, patch_size=PATCH)
    if kind == "onevision":
        config = transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(**vision), text_config=transformers.Qwen2Config(**text),
            image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=PINPOINTS,
        )
        model_class = transformers.LlavaOnevisionForConditionalGeneration
    else:
        language = transformers.LlamaConfig(**text) if kind == "next" else transformers.MistralConfig(
            sliding_window=10, **text)  # every layer slides, over fewer tokens than an image has
        config = transformers.LlavaNextConfig(
            vision_config=transformers.CLIPVisionConfig(**vision), text_config=language, image_token_index=IMAGE,
            image_grid_pinpoints=PINPOINTS,
        )
        model_class = transformers.LlavaNextForConditionalGeneration
    model = model_class._from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


_MODELS = {}


def model_of(kind: str = "next", attn: str = "sdpa"):
    if (kind, attn) not in _MODELS:
        _MODELS[kind, attn] = build(kind, attn)
    return _MODELS[kind, attn]


def patches_of(size: tuple[int, int]) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(size, PINPOINTS, TILE)


def sample(kind: str, sizes: list[tuple[int, int]], text_before: int, text_after: int, seed: int,
           video_frames: int = 0) -> dict:
    """One prompt: [BOS, text, (image tokens, text) per image, (video tokens, text), text]; each image's token
    count is what the model's image features have (base view, tiles and newline tokens)."""
    generator = torch.Generator().manual_seed(seed)
    model = model_of(kind)
    pixels = [torch.randn(patches_of(size), 3, TILE, TILE, generator=generator) for size in sizes]
    image_sizes = torch.tensor(sizes).view(-1, 2)
    counts = []
    if sizes:
        options = {"batch_num_images": [len(sizes)]} if kind == "onevision" else {}
        with torch.no_grad():
            features = model.model.get_image_features(padded(pixels), image_sizes, **options).pooler_output
        counts = [len(image) for image in features]
    parts = [torch.tensor([BOS]), torch.randint(3, 100, (text_before,), generator=generator)]
    for count in counts:
        parts += [torch.full((count,), IMAGE), torch.randint(3, 100, (2,), generator=generator)]
    video = None
    if video_frames:
        video = torch.randn(1, video_frames, 3, TILE, TILE, generator=generator)
        pooled = math.ceil(TILE // PATCH / 2)
        video_tokens = torch.full((video_frames * pooled * pooled + 1,), VIDEO)  # frames, then a newline token
        parts += [video_tokens, torch.randint(3, 100, (2,), generator=generator)]
    parts.append(torch.randint(3, 100, (text_after,), generator=generator))
    return dict(ids=torch.cat(parts), pixels=pixels, sizes=image_sizes, video=video)


def padded(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Images of different patch counts stacked [N, P, 3, TILE, TILE] (zero patches after an image's own)."""
    most = max(len(image) for image in pixels)
    return torch.stack([torch.cat([image, image.new_zeros(most - len(image), *image.shape[1:])]) for image in pixels])


def batch(kind: str, samples: list[dict]) -> dict:
    width = max(len(s["ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), PAD)
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, s in enumerate(samples):
        input_ids[row, width - len(s["ids"]) :] = s["ids"]
        attention_mask[row, width - len(s["ids"]) :] = 1
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    pixels = [image for s in samples for image in s["pixels"]]
    if pixels:
        inputs.update(pixel_values=padded(pixels), image_sizes=torch.cat([s["sizes"] for s in samples]))
        if kind == "onevision":
            inputs["batch_num_images"] = torch.tensor([len(s["pixels"]) for s in samples])
    videos = [s["video"] for s in samples if s["video"] is not None]
    if videos:
        inputs["pixel_values_videos"] = torch.cat(videos)
    return inputs


def newline_positions(model, inputs: dict) -> torch.Tensor:
    """Bool [B, T]: placeholders that receive the image_newline vector, from the model's own features."""
    with torch.no_grad():
        options = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
        features = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                            **options).pooler_output)
    newline = (features == model.model.image_newline).all(-1)
    positions = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    positions[inputs["input_ids"] == IMAGE] = newline
    return positions


def two_images(kind: str) -> dict:
    """A wide image (base view and 2 tiles) and a tall one (4 tiles, unpadded), for one sample."""
    return sample(kind, [(20, 40), (30, 20)], text_before=3, text_after=4, seed=1)


@pytest.mark.parametrize("kind", ["next", "onevision"])
def test_keep_all_equals_dense(kind):
    check_keep_all_equals_dense(model_of(kind), batch(kind, [two_images(kind)]), SUPPRESS, keep_all())


@pytest.mark.parametrize(
    "kind,attn,budget", [("next", "sdpa", 0.25), ("next", "eager", 3), ("next-mistral", "sdpa", 0.25),
                         ("onevision", "sdpa", 0.25), ("onevision", "eager", 3)]
)
def test_each_image_keeps_its_budget_and_decoding_equals_the_oracle(kind, attn, budget):
    model = model_of(kind, attn)
    inputs = batch(kind, [two_images(kind)])
    record = check_against_oracle(model, model.model.language_model, inputs, SUPPRESS, with_budget(budget), attn)
    newline = newline_positions(model, inputs)[0]
    image = inputs["input_ids"][0] == IMAGE
    runs = image.long().diff(prepend=torch.zeros(1, dtype=torch.long)).eq(1).cumsum(0) - 1  # image of each token
    visual_counts = [int((image & ~newline & (runs == k)).sum()) for k in range(2)]
    expected = [math.ceil(budget * n) if isinstance(budget, float) else budget for n in visual_counts]
    with cm.sparsify(model, with_budget(budget)) as session:
        call = session.adapter.read_entry_call((), inputs)
        layout = session.adapter.image_layout(call, session.adapter.visual_mask(call))
    assert kept_per_image(record, layout) == expected
    assert torch.equal(record.visual_mask[0], image & ~newline)  # newline tokens are not visual: not counted
    assert record.keep_mask[0][newline].all()  # ... and never removed


def test_the_layout_from_image_sizes_equals_the_one_from_features():
    """A plain forward brings pixels and sizes (the layout comes from the sizes), generate() brings the
    encoded features (the layout comes from their newline rows): both find the model's newline tokens."""
    model = model_of("onevision")
    samples = [two_images("onevision"), sample("onevision", [(16, 16)], 2, 3, seed=4)]
    inputs = batch("onevision", samples)
    with cm.sparsify(model, with_budget(2)) as session:
        from_sizes = session.adapter.visual_mask(session.adapter.read_entry_call((), inputs))
    expected = (inputs["input_ids"] == IMAGE) & ~newline_positions(model, inputs)
    assert torch.equal(from_sizes, expected)


@pytest.mark.parametrize("kind", ["next", "onevision"])
def test_a_plain_forward_with_pixels_equals_the_oracle(kind):
    model = model_of(kind)
    inputs = batch(kind, [two_images(kind)])
    with cm.sparsify(model, with_budget(0.25)) as session, torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        record = session.last
    length = inputs["input_ids"].shape[1]
    removed = removed_mask(record.keep_mask, record.visual_mask, length)
    with masked_reference(model.model.language_model, {}, removed, PRUNE_LAYER), torch.no_grad():
        expected = model(**inputs).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_a_video_and_an_image_each_keep_their_budget_and_equal_the_oracle():
    model = model_of("onevision")
    inputs = batch("onevision", [sample("onevision", [(20, 40)], 2, 3, seed=5, video_frames=3)])
    record = check_against_oracle(model, model.model.language_model, inputs, SUPPRESS, with_budget(0.25, True))
    video = inputs["input_ids"][0] == VIDEO
    video_tokens = int(video.sum()) - 1  # 3 frames of 2 x 2 pooled tokens, then a newline token
    assert video_tokens == 12
    assert int((record.keep_mask[0] & record.visual_mask[0] & video).sum()) == math.ceil(0.25 * video_tokens)
    assert record.keep_mask[0][video.nonzero().max()]  # the video's newline token is kept


@pytest.mark.parametrize("kind", ["next", "onevision"])
def test_a_static_cache_equals_the_oracle(kind):
    model = model_of(kind)
    inputs = batch(kind, [two_images(kind)])
    check_against_oracle(model, model.model.language_model, inputs, SUPPRESS, with_budget(0.25, True),
                         cache_implementation="static")


@pytest.mark.parametrize("kind", ["next", "onevision"])
def test_core_neuron_decoding_equals_the_oracle(kind):
    model = model_of(kind)
    record = check_against_oracle(model, model.model.language_model, batch(kind, [two_images(kind)]), SUPPRESS,
                                  with_budget(0.25, True))
    assert sorted(record.core_neurons) == NEURON_LAYERS


@pytest.mark.parametrize(
    "kind,method",
    [("next", with_budget(0.25, True)), ("onevision", with_budget(0.25, True)),
     ("onevision", cm.RandomTokens(token_budget=3, prune_layer=PRUNE_LAYER))],
    ids=["next", "onevision", "onevision-random"],
)
def test_a_batch_of_different_sizes_equals_each_sample_alone(kind, method):
    """A tiled image beside two untiled ones (OneVision tiles a sample's only image): the same tokens alone."""
    first = sample(kind, [(16, 30)], text_before=2, text_after=3, seed=2)
    second = sample(kind, [(40, 12), (12, 12)], text_before=6, text_after=2, seed=3)
    alone = [batch(kind, [first]), batch(kind, [second])]
    check_batch_equals_alone(model_of(kind), batch(kind, [first, second]), alone, SUPPRESS, method)


@pytest.mark.parametrize("method", [with_budget(0.25, True), cm.VisionZip(dominant=4, contextual=2)],
                         ids=["corematching", "visionzip"])
def test_the_model_is_restored_after_the_block_and_after_an_exception(method):
    """VisionZip also wraps the model's feature packing for the session."""
    check_restored(model_of("next"), batch("next", [two_images("next")]), SUPPRESS, method)


def test_pixels_without_image_sizes_are_named():
    inputs = batch("next", [two_images("next")])
    del inputs["image_sizes"]
    with cm.sparsify(model_of("next"), with_budget(2)), pytest.raises(ValueError, match="image_sizes"):
        model_of("next")(**inputs)


def test_a_second_turn_with_a_new_image_equals_the_oracle():
    """A new turn over the first turn's cache brings an image: its tokens are chosen among the new tokens."""
    model = model_of("next")
    one = sample("next", [(20, 40)], 2, 3, seed=14)
    two = sample("next", [(30, 20)], 0, 4, seed=15)
    two["ids"] = two["ids"][1:]  # no BOS
    mask = torch.ones(1, len(one["ids"]) + len(two["ids"]), dtype=torch.long)
    with cm.sparsify(model, with_budget(0.25)) as session, torch.no_grad():
        cache = model(**batch("next", [one]), use_cache=True).cache
        first = session.last
        logits = model(**{**batch("next", [two]), "attention_mask": mask}, cache=cache).logits[:, -1]
        second = session.last
    assert len(second.kept_visual_positions[0]) == math.ceil(0.25 * int(second.visual_mask.sum()))
    both = dict(ids=torch.cat([one["ids"], two["ids"]]), pixels=one["pixels"] + two["pixels"],
                sizes=torch.cat([one["sizes"], two["sizes"]]), video=None)
    removed = torch.cat([first.visual_mask & ~first.keep_mask, second.visual_mask & ~second.keep_mask], dim=1)
    with masked_reference(model.model.language_model, {}, removed, PRUNE_LAYER), torch.no_grad():
        expected = model(**batch("next", [both])).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_an_empty_pixel_batch_runs_like_the_dense_model():
    model = model_of("next")
    inputs = batch("next", [sample("next", [], 3, 4, seed=1)])
    inputs.update(pixel_values=torch.zeros(0, 5, 3, TILE, TILE), image_sizes=torch.zeros(0, 2, dtype=torch.long))
    with torch.no_grad():
        dense = model(**inputs).logits
        with cm.sparsify(model, with_budget(2)):
            assert torch.equal(model(**inputs).logits, dense)


def test_methods_ranking_by_the_vision_tower_attention_are_refused_on_onevision():
    """OneVision resizes the tile features of large images, so its tokens are not tower patches."""
    with pytest.raises(cm.UnsupportedModelError, match="the vision tower's attention are not supported"):
        cm.sparsify(model_of("onevision"), cm.VisionZip(dominant=2, contextual=1))


# ----------------------------------------------------------------------------- VisionZip on tiles


def tile_patches(tile_rows: int, tile_cols: int, kept_rows: range | None = None) -> list[tuple[int, int]]:
    """(tower row, patch) of each visual token of an image, by hand: the base view's patches, then the tiles'
    patches row by row across the tiles (tile_rows x tile_cols tiles of a 3 x 3 grid each), only `kept_rows` of
    that combined grid when unpadding crops it (newline tokens are not visual)."""
    side = TILE // PATCH
    tokens = [(0, patch) for patch in range(side * side)]
    for row in kept_rows if kept_rows is not None else range(tile_rows * side):
        for col in range(tile_cols * side):
            tile = 1 + (row // side) * tile_cols + col // side
            tokens.append((tile, (row % side) * side + col % side))
    return tokens


# image size -> its tokens: 24 x 12 is two tiles high; 12 x 24 two tiles wide; 18 x 12 is unpadded to 4 of 6 rows
TILED_IMAGES = {(24, 12): tile_patches(2, 1), (12, 24): tile_patches(1, 2), (18, 12): tile_patches(2, 1, range(1, 5))}


def test_visionzip_ranks_each_token_by_its_own_tile_s_cls_attention():
    """The tower runs on every image's base view and tiles; each visual token gets the CLS attention of its own
    tile's patch (mapped by hand here), and the image's dominant tokens are the top of those."""
    from test_baselines import tower_cls_attention

    sizes = list(TILED_IMAGES)
    s = sample("next", sizes, text_before=2, text_after=3, seed=4)
    inputs = batch("next", [s])
    tiles = torch.cat([pixels for pixels in s["pixels"]])  # every image's tower rows, in order
    attention = tower_cls_attention(model_of("next", "eager"), tiles)  # [tower rows, 9]
    dominant = 4
    with cm.sparsify(model_of("next"), cm.VisionZip(dominant=dominant, contextual=0)) as session:
        model_of("next")(**inputs)
    visual = ((inputs["input_ids"][0] == IMAGE) & ~newline_positions(model_of("next"), inputs)[0]).nonzero().flatten()
    expected, first_token, first_row = [], 0, 0
    for size in sizes:
        tokens = TILED_IMAGES[size]
        scores = [float(attention[first_row + tile, patch]) for tile, patch in tokens]
        top = sorted(range(len(tokens)), key=lambda i: (-scores[i], i))[:dominant]
        expected += [int(visual[first_token + i]) for i in sorted(top)]
        first_token += len(tokens)
        first_row += 1 + max(tile for tile, _ in tokens)
    assert first_token == len(visual)  # the hand map covers every visual token
    assert session.last.kept_visual_positions[0].tolist() == expected


def test_visionzip_on_tiles_equals_the_oracle():
    model = model_of("next")
    inputs = batch("next", [sample("next", [(18, 12), (12, 24)], text_before=2, text_after=3, seed=5)])
    record = check_against_oracle(model, model.model.language_model, inputs, SUPPRESS,
                                  cm.VisionZip(dominant=5, contextual=0))
    assert record.prune_layer == -1 and len(record.kept_visual_positions[0]) == 10


def test_visionzip_on_tiles_with_beam_search_over_a_batch_equals_the_oracle():
    """generate() encodes the images once and expands the rows: each row reads its own sample's patches."""
    model = model_of("next")
    inputs = batch("next", [sample("next", [(18, 12), (12, 24)], text_before=2, text_after=3, seed=5),
                            sample("next", [(24, 12)], text_before=4, text_after=2, seed=7)])
    check_against_oracle(model, model.model.language_model, inputs, SUPPRESS, cm.VisionZip(dominant=5, contextual=0),
                         num_beams=2, num_return_sequences=2)


def test_visionzip_merges_tiles_by_their_own_patch_keys():
    """Contextual tokens on tiles: the layer-0 input under the session holds the kept tokens, each target merged
    by the documented rule with the tower keys of its own tile's patch (mapped by hand)."""
    from test_baselines import naive_visionzip, tower_cls_attention, tower_keys

    model = model_of("next")
    size = (18, 12)
    s = sample("next", [size], text_before=2, text_after=3, seed=6)
    inputs = batch("next", [s])
    tokens = TILED_IMAGES[size]
    attention = tower_cls_attention(model_of("next", "eager"), s["pixels"][0])
    keys = tower_keys(model, s["pixels"][0])
    captured = []

    def layer_input(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())

    first_layer = model.model.language_model.layers[0]
    with torch.no_grad():
        hook = first_layer.register_forward_pre_hook(layer_input, with_kwargs=True)
        model(**inputs)  # dense: the input embeddings
        hook.remove()
    dominant, contextual = 4, 3
    with cm.sparsify(model, cm.VisionZip(dominant=dominant, contextual=contextual)) as session, torch.no_grad():
        hook = first_layer.register_forward_pre_hook(layer_input, with_kwargs=True)  # after the session's hook
        model(**inputs)
        hook.remove()
    embeds, packed = captured[0][0], captured[1][0]
    visual = ((inputs["input_ids"][0] == IMAGE) & ~newline_positions(model, inputs)[0]).nonzero().flatten()
    kept, merged = naive_visionzip([float(attention[tile, patch]) for tile, patch in tokens], embeds[visual],
                                   torch.stack([keys[tile, patch] for tile, patch in tokens]), dominant, contextual)
    record = session.last
    assert record.kept_visual_positions[0].tolist() == [int(visual[i]) for i in kept]
    slot_of = {int(position): slot for slot, position in enumerate(record.kept_positions[0])}
    slots = packed.shape[0] - len(slot_of)  # packed rows are right-aligned after padding slots
    for ordinal, embedding in merged.items():
        torch.testing.assert_close(packed[slots + slot_of[int(visual[ordinal])]], embedding, atol=1e-5, rtol=0)
