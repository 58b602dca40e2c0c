"""The baselines (FastV, PDrop, DART, DivPrune, CDPruner, VisionZip, RandomTokens, TEAL, CoreInfer, compose):
each against a reference computed here without the code under test, every token method exact against the oracle
(tests/oracle.py) and batch invariant, and the inputs a method may ask for."""

import math

import pytest
import torch
import torch.nn.functional as F
from oracle import masked_reference, removed_mask
from reference import image_embeddings
from test_engine import PROMPTS, batch_and_alone, check_batch_equals_alone
from test_session import assert_restored, warm_snapshot
from tiny_llava import IMAGE_TOKEN, VISUAL_TOKENS, build_pixels, build_prompt, left_pad

import corematching as cm

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
ATOL = 1e-5


def generate(model, inputs, steps=STEPS):
    out = model.generate(
        **inputs,
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        suppress_tokens=[IMAGE_TOKEN],
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def inputs_of(prompt, pixels):
    return dict(
        input_ids=prompt.unsqueeze(0), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pixel_values=pixels
    )


def run(model, method, inputs):
    """(sequences, logits, record) of a greedy generation under the method."""
    with cm.sparsify(model, method) as session:
        tokens, logits = generate(model, inputs)
        return tokens, logits, session.last


def visual_positions(input_ids: torch.Tensor) -> list[int]:
    return (input_ids == IMAGE_TOKEN).nonzero().flatten().tolist()


def kept_visual(record, row=0) -> list[int]:
    return record.kept_visual_positions[row].tolist()


# ---------------------------------------------------------------------------------------------- every token method

TOKEN_METHODS = [
    cm.FastV(prune_layer=1, token_budget=8),
    cm.PDrop(schedule=((2, 0.25),)),
    cm.PDrop(schedule=((0, 0.6), (2, 0.5))),
    cm.DART(pivots=3, token_budget=10, prune_layer=1),
    cm.DivPrune(token_budget=8),
    cm.DivPrune(token_budget=0.3, prune_layer=1),
    cm.CDPruner(token_budget=8),
    cm.CDPruner(token_budget=7, prune_layer=2),
    cm.VisionZip(dominant=6, contextual=3),
    cm.RandomTokens(token_budget=8, seed=3, prune_layer=1),
]
TOKEN_IDS = ["fastv", "pdrop", "pdrop-2-stages", "dart", "divprune-1", "divprune1", "cdpruner-1", "cdpruner2",
             "visionzip", "random"]


def oracle_generate(model, record, inputs, neurons=False, embeds=None):
    """The oracle's generation for a record: removed tokens blocked from layer K + 1 on (core neurons zeroed
    while decoding when `neurons`); `embeds` replaces the prompt's input embeddings (merged tokens)."""
    length = inputs["input_ids"].shape[1]
    stages = record.stage_keep_masks or {record.prune_layer: record.keep_mask}
    removed = {layer: removed_mask(keep, record.visual_mask, length + STEPS) for layer, keep in stages.items()}
    language_model = model.model.language_model
    ffns = {layer: language_model.layers[layer].mlp for layer in record.neurons} if neurons else {}
    core = record.core_neurons_per_sample if neurons else None
    if embeds is not None:
        inputs = dict(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    with masked_reference(language_model, ffns, removed, record.prune_layer, core, length):
        return generate(model, inputs)


@pytest.mark.parametrize("method", TOKEN_METHODS, ids=TOKEN_IDS)
def test_token_methods_equal_the_oracle_and_are_batch_invariant(tiny_llava, method):
    model = tiny_llava()
    inputs = inputs_of(build_prompt(3, 5, seed=0), build_pixels(1, seed=0))
    tokens, logits, record = run(model, method, inputs)
    assert record.prune_layer == method.prune_layer_index()
    assert 0 < len(kept_visual(record)) < VISUAL_TOKENS
    if not isinstance(method, cm.VisionZip):  # merged embeddings: see test_visionzip_merges_as_documented
        expected_tokens, expected_logits = oracle_generate(model, record, inputs)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    batch, alone = batch_and_alone(model, method, PROMPTS, build_pixels(2, seed=6))
    check_batch_equals_alone(batch, alone, PROMPTS)


@pytest.mark.parametrize(
    "method", [cm.VisionZip(dominant=6, contextual=3), cm.RandomTokens(token_budget=8, seed=3)], ids=["vz", "random"]
)
def test_images_encoded_by_generate_for_beams_keep_each_samples_tokens(tiny_llava, method):
    """Beam search: generate encodes the images first and repeats them per beam; every beam keeps its sample's."""
    model = tiny_llava()
    input_ids, attention_mask = left_pad(PROMPTS)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=build_pixels(2, seed=6))
    with cm.sparsify(model, method) as session:
        model(**inputs)
        plain = session.last
        model.generate(**inputs, num_beams=2, max_new_tokens=2, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
        beams = session.last
    assert beams.batch_size == 4
    for row in range(4):
        assert torch.equal(beams.keep_mask[row], plain.keep_mask[row // 2])


@pytest.mark.parametrize(
    "method",
    [
        cm.FastV(prune_layer=1, token_budget=8),
        cm.VisionZip(dominant=6, contextual=3),
        cm.RandomTokens(token_budget=8),
        cm.compose(cm.CDPruner(token_budget=8), cm.TEAL(sparsity=0.5)),
    ],
    ids=["fastv", "visionzip", "random", "cdpruner+teal"],
)
def test_the_model_is_restored_after_methods_that_hook_more(tiny_llava, single_inputs, method):
    """Methods with inputs hook the prune layer's attention, the first layer and the vision tower too."""
    model, inputs = tiny_llava(), single_inputs()
    before = warm_snapshot(model, inputs)
    with cm.sparsify(model, method) as session:
        if session.engine.decode_ffn_layers:  # TEAL decodes with thresholds calibrated first
            session.calibrate(**inputs)
        model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    assert_restored(model, before)


# ---------------------------------------------------------------------------------------------- FastV, PDrop


def eager_last_token_attention(model, inputs, layer: int) -> torch.Tensor:
    """[B, T]: the last token's attention row at `layer` averaged over heads, from the eager model's weights."""
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    return attentions[layer][:, :, -1, :].mean(dim=1)


def top_visual(scores: torch.Tensor, visual: list[int], count: int) -> list[int]:
    return sorted(sorted(visual, key=lambda v: (-float(scores[v]), v))[:count])


def test_fastv_scores_are_the_eager_attention_of_the_last_token(tiny_llava):
    """sdpa model under FastV vs the same weights run eagerly with output_attentions, on a left-padded batch."""
    input_ids, attention_mask = left_pad(PROMPTS)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=build_pixels(2, seed=6))
    for layer in (0, 2):
        expected = eager_last_token_attention(tiny_llava("eager"), inputs, layer)
        method = cm.FastV(prune_layer=layer, token_budget=5)
        with cm.sparsify(tiny_llava("sdpa"), method) as session:
            tiny_llava("sdpa")(**inputs)
            record = session.last
        torch.testing.assert_close(record.token_scores, expected, atol=ATOL, rtol=0)
        for row in range(2):
            visual = visual_positions(input_ids[row])
            assert kept_visual(record, row) == top_visual(expected[row], visual, 5)


def test_fastv_scores_on_gemma3_with_sliding_windows_and_head_norms():
    """Gemma 3: local layers see a window shorter than the prompt, queries and keys are normalized per head."""
    import test_family_gemma3 as gemma3

    inputs = gemma3.batch([gemma3.sample(1, 2, 3, 1), gemma3.sample(1, 5, 4, 2)])
    for layer in (1, 2):  # a sliding and a global layer
        with torch.no_grad():
            attentions = gemma3.model_of("eager")(**inputs, output_attentions=True).attentions
        model = gemma3.model_of("sdpa")
        with cm.sparsify(model, cm.FastV(prune_layer=layer, token_budget=3)) as session:
            model(**inputs)
        torch.testing.assert_close(session.last.token_scores, attentions[layer][:, :, -1].mean(1), atol=ATOL, rtol=0)


def test_pdrop_one_stage_keeps_its_ratio_by_attention(tiny_llava, single_inputs):
    inputs = single_inputs()
    expected = eager_last_token_attention(tiny_llava("eager"), inputs, 2)[0]
    with cm.sparsify(tiny_llava(), cm.PDrop(schedule=[(2, 0.25)])) as session:
        tiny_llava()(**inputs)
    visual = visual_positions(inputs["input_ids"][0])
    assert kept_visual(session.last) == top_visual(expected, visual, math.ceil(0.25 * VISUAL_TOKENS))


def test_pdrop_stages_rank_the_tokens_left_by_the_eager_attention_at_each_stage(tiny_llava, single_inputs):
    """Stage 1 ranks by the last token's attention at layer 0; stage 2 by its attention at layer 2 in the model
    where stage 1's removed tokens are blocked (the eager model under the oracle mask, output_attentions)."""
    inputs = single_inputs()
    visual = visual_positions(inputs["input_ids"][0])
    method = cm.PDrop(schedule=((0, 0.5), (2, 0.5)))
    with cm.sparsify(tiny_llava(), method) as session:
        tiny_llava()(**inputs)
    record = session.last
    assert sorted(record.stage_keep_masks) == [0, 2]
    first = eager_last_token_attention(tiny_llava("eager"), inputs, 0)[0]
    kept_first = top_visual(first, visual, math.ceil(0.5 * VISUAL_TOKENS))
    assert record.stage_keep_masks[0][0].nonzero().flatten().tolist() == sorted(
        set(range(len(inputs["input_ids"][0]))) - set(visual) | set(kept_first)
    )
    eager = tiny_llava("eager")
    removed = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    removed[0, sorted(set(visual) - set(kept_first))] = True
    with masked_reference(eager.model.language_model, {}, removed, 0, attn="eager"):
        second = eager_last_token_attention(eager, inputs, 2)[0]
    assert kept_visual(record) == top_visual(second, kept_first, math.ceil(0.5 * len(kept_first)))
    assert len(kept_visual(record)) == math.ceil(0.5 * math.ceil(0.5 * VISUAL_TOKENS))


def test_pdrop_stages_must_increase_and_exist(tiny_llava):
    with pytest.raises(ValueError, match="layers must increase"):
        cm.PDrop(schedule=((2, 0.5), (2, 0.5)))
    with pytest.raises(ValueError, match="after layer 40 is out of range"):
        cm.sparsify(tiny_llava(), cm.PDrop(schedule=((1, 0.5), (40, 0.5))))


# ---------------------------------------------------------------------------------------------- VisionZip


def tower_cls_attention(model, pixels) -> torch.Tensor:
    """[N, patches]: the CLS row of the tower's feature layer, averaged over heads (eager, output_attentions)."""
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True)
    layer = model.config.vision_feature_layer  # hidden_states[l] comes out of attentions[l] for negative l
    return out.attentions[layer][:, :, 0, 1:].mean(dim=1)


def tower_keys(model, pixels) -> torch.Tensor:
    """[N, patches, d]: the keys of the tower's feature layer averaged over heads, from its input hidden states."""
    tower = model.model.vision_tower
    layer_index = len(tower.encoder.layers) + model.config.vision_feature_layer  # a negative feature layer
    with torch.no_grad():
        layer_input = tower(pixels, output_hidden_states=True).hidden_states[layer_index]
        layer = tower.encoder.layers[layer_index]
        keys = layer.self_attn.k_proj(layer.layer_norm1(layer_input))
    heads = layer.self_attn.num_heads
    return keys.view(*keys.shape[:2], heads, -1).mean(dim=2)[:, 1:]


def naive_visionzip(attention: list[float], embeddings, keys, dominant: int, contextual: int):
    """(kept ordinals, {target ordinal: merged embedding}) by the documented rule, in plain Python."""
    size = len(attention)
    dominant_set = sorted(range(size), key=lambda i: (-attention[i], i))[:dominant]
    remaining = [i for i in range(size) if i not in dominant_set]
    step = max(1, len(remaining) // contextual)
    targets = remaining[::step][:contextual]
    others = [i for i in remaining if i not in targets]
    assigned = {t: [] for t in targets}
    for i in others:
        similarities = [F.cosine_similarity(keys[i], keys[t], dim=0).item() for t in targets]
        assigned[targets[similarities.index(max(similarities))]].append(i)
    merged = {}
    for t, members in assigned.items():
        extra = torch.stack([embeddings[i] for i in members]).mean(0) if members else 0
        merged[t] = embeddings[t] + extra
    return sorted(dominant_set + targets), merged


def test_visionzip_dominant_tokens_are_the_top_cls_attention(tiny_llava):
    prompts = [build_prompt(2, 3, seed=1), build_prompt(6, 9, seed=2)]
    input_ids, attention_mask = left_pad(prompts)
    pixels = build_pixels(2, seed=5)
    cls_attention = tower_cls_attention(tiny_llava("eager"), pixels)
    with cm.sparsify(tiny_llava(), cm.VisionZip(dominant=7, contextual=0)) as session:
        tiny_llava()(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
    for row in range(2):
        visual = visual_positions(input_ids[row])
        expected = sorted(sorted(range(VISUAL_TOKENS), key=lambda i: (-float(cls_attention[row, i]), i))[:7])
        assert kept_visual(session.last, row) == [visual[i] for i in expected]
    assert session.last.prune_layer == -1


def test_visionzip_merges_as_documented_and_equals_the_oracle(tiny_llava, single_inputs):
    """Layer 0 on: the kept tokens only, the contextual targets with e_t + mean(e of the tokens assigned to t)."""
    model, inputs = tiny_llava(), single_inputs()
    dominant, contextual = 5, 4
    tokens, logits, record = run(model, cm.VisionZip(dominant=dominant, contextual=contextual), inputs)
    embeds = image_embeddings(model, inputs["input_ids"], inputs["pixel_values"])[0].detach()
    visual = visual_positions(inputs["input_ids"][0])
    attention = tower_cls_attention(tiny_llava("eager"), inputs["pixel_values"])[0].tolist()
    keys = tower_keys(model, inputs["pixel_values"])[0]
    kept, merged = naive_visionzip(attention, embeds[visual], keys, dominant, contextual)
    assert kept_visual(record) == [visual[i] for i in kept]
    expected_embeds = embeds.clone()
    for ordinal, embedding in merged.items():
        expected_embeds[visual[ordinal]] = embedding
    expected_tokens, expected_logits = oracle_generate(model, record, inputs, embeds=expected_embeds.unsqueeze(0))
    assert torch.equal(tokens[:, inputs["input_ids"].shape[1] :], expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------ DART, DivPrune, CDPruner


def hidden_entering(model, inputs, layer: int) -> torch.Tensor:
    """[T, H]: the dense model's hidden states entering decoder layer `layer` (0: the input embeddings)."""
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[layer][0]


def cosine_matrix(features: torch.Tensor) -> list[list[float]]:
    normalized = F.normalize(features.double(), dim=-1)
    return (normalized @ normalized.T).tolist()


def naive_dart(features: torch.Tensor, text: torch.Tensor, pivots: int, text_pivots: int, budget: int) -> list[int]:
    def top_l1(rows, count):
        norms = rows.abs().sum(-1).tolist()
        return sorted(range(len(norms)), key=lambda i: (-norms[i], i))[:count]

    pivot_list = top_l1(features, min(pivots, budget))
    references = [features[p] for p in pivot_list] + [text[p] for p in top_l1(text, text_pivots)]
    chosen = list(pivot_list)
    rest = budget - len(pivot_list)
    for index, reference in enumerate(references):
        share = rest // len(references) + (1 if index < rest % len(references) else 0)
        similarity = [F.cosine_similarity(row.double(), reference.double(), dim=0).item() for row in features]
        pool = sorted((i for i in range(len(features)) if i not in chosen), key=lambda i: (similarity[i], i))
        chosen += pool[:share]
    return sorted(chosen)


def naive_divprune(features: torch.Tensor, budget: int) -> list[int]:
    distance = [[1 - c for c in row] for row in cosine_matrix(features)]
    size = len(distance)
    isolation = [min(distance[i][j] for j in range(size) if j != i) for i in range(size)]
    picked = [max(range(size), key=lambda i: (isolation[i], -i))]
    while len(picked) < budget:
        candidates = [i for i in range(size) if i not in picked]
        picked.append(max(candidates, key=lambda i: (min(distance[i][p] for p in picked), -i)))
    return sorted(picked)


def naive_cdpruner(visual: torch.Tensor, instruction: torch.Tensor, budget: int) -> list[int]:
    """Greedy MAP by explicit determinants of L = diag(r) S diag(r)."""
    normalized = F.normalize(visual.double(), dim=-1)
    relevance = (normalized @ F.normalize(instruction.double(), dim=-1).T).mean(1)
    relevance = (relevance - relevance.min()) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * (normalized @ normalized.T) * relevance[None, :]
    picked = []
    for _ in range(budget):
        gains = {
            i: torch.linalg.det(kernel[picked + [i]][:, picked + [i]]).item()
            for i in range(len(relevance))
            if i not in picked
        }
        picked.append(max(gains, key=lambda i: (gains[i], -i)))
    return sorted(picked)


@pytest.mark.parametrize("text_pivots", [0, 2])
def test_dart_keeps_pivots_and_their_least_similar_tokens(tiny_llava, single_inputs, text_pivots):
    model, inputs = tiny_llava(), single_inputs(text_before=3, text_after=6)
    ids = inputs["input_ids"][0]
    visual = visual_positions(ids)
    hidden = hidden_entering(model, inputs, 2)
    instruction = list(range(visual[-1] + 1, len(ids)))
    method = cm.DART(pivots=3, token_budget=11, prune_layer=1, text_pivots=text_pivots)
    with cm.sparsify(model, method) as session:
        model(**inputs)
    expected = naive_dart(hidden[visual], hidden[instruction], 3, text_pivots, 11)
    assert kept_visual(session.last) == [visual[i] for i in expected]


@pytest.mark.parametrize("prune_layer", [-1, 2])
def test_divprune_is_the_greedy_max_min_diverse_set(tiny_llava, single_inputs, prune_layer):
    model, inputs = tiny_llava(), single_inputs()
    visual = visual_positions(inputs["input_ids"][0])
    features = hidden_entering(model, inputs, prune_layer + 1)[visual]
    with cm.sparsify(model, cm.DivPrune(token_budget=9, prune_layer=prune_layer)) as session:
        model(**inputs)
    assert kept_visual(session.last) == [visual[i] for i in naive_divprune(features, 9)]


def test_cdpruner_is_the_greedy_map_of_the_conditional_dpp(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs(text_before=3, text_after=6)
    ids = inputs["input_ids"][0]
    visual = visual_positions(ids)
    embeds = hidden_entering(model, inputs, 0)
    instruction = list(range(visual[-1] + 1, len(ids)))  # the text after the image
    with cm.sparsify(model, cm.CDPruner(token_budget=6)) as session:
        model(**inputs)
    expected = naive_cdpruner(embeds[visual], embeds[instruction], 6)
    assert kept_visual(session.last) == [visual[i] for i in expected]


# ---------------------------------------------------------------------------------------------- RandomTokens


def kept_ordinals(record, row) -> list[int]:
    visual = record.visual_positions[row].tolist()
    return [visual.index(p) for p in kept_visual(record, row)]


def test_random_tokens_draw_per_image_content_not_per_position(tiny_llava):
    model = tiny_llava()
    pixels = build_pixels(2, seed=7)
    same_twice = torch.cat([pixels[:1], pixels[:1]])
    prompts = [build_prompt(2, 3, seed=1), build_prompt(6, 9, seed=2)]
    input_ids, attention_mask = left_pad(prompts)
    method = cm.RandomTokens(token_budget=8, seed=0, prune_layer=1)
    with cm.sparsify(model, method) as session:
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
        different = session.last
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=same_twice)
        same = session.last
        generate(model, inputs_of(prompts[0], pixels[:1]))  # generate encodes the image before the call
        by_generate = session.last
    assert kept_ordinals(different, 0) != kept_ordinals(different, 1)
    assert kept_ordinals(same, 0) == kept_ordinals(same, 1) == kept_ordinals(different, 0)
    assert kept_ordinals(by_generate, 0) == kept_ordinals(different, 0)
    with cm.sparsify(model, cm.RandomTokens(token_budget=8, seed=1, prune_layer=1)) as session:
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
    assert kept_ordinals(session.last, 0) != kept_ordinals(different, 0)  # the seed matters too


# ---------------------------------------------------------------------------------------------- neuron methods


def ffn_inputs(model, inputs) -> dict[int, torch.Tensor]:
    """{layer: [T, H]} the dense model's FFN inputs over the prompt."""
    seen, handles = {}, []
    for layer, decoder_layer in enumerate(model.model.language_model.layers):
        def hook(module, args, layer=layer):
            seen[layer] = args[0][0].detach().clone()

        handles.append(decoder_layer.mlp.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return seen


def test_teal_thresholds_give_the_asked_sparsity_and_decoding_uses_them(tiny_llava, single_inputs):
    model = tiny_llava(seed=5)  # a model no other test calibrates
    calibration = single_inputs(text_before=6, text_after=8, seed=3)
    sparsity = 0.4
    teal = cm.TEAL(sparsity=sparsity)
    dense_inputs = ffn_inputs(model, calibration)
    language_model = model.model.language_model
    inputs = single_inputs(seed=4)
    with cm.sparsify(model, teal) as session:
        session.calibrate(**calibration)
        decode_inputs, handles = {}, []
        for layer, decoder_layer in enumerate(language_model.layers):
            def hook(module, args, layer=layer):
                if args[0].shape[1] == 1:
                    decode_inputs.setdefault(layer, []).append(args[0].detach().clone())

            handles.append(decoder_layer.mlp.gate_proj.register_forward_pre_hook(hook))
        tokens, logits = generate(model, inputs)
        for handle in handles:
            handle.remove()
    for layer, values in dense_inputs.items():
        mlp = language_model.layers[layer].mlp
        input_threshold, activation_threshold = teal.thresholds(mlp)
        assert int((values.abs() <= input_threshold).sum()) == round(sparsity * values.numel())
        activation = mlp.act_fn(mlp.gate_proj(values)) * mlp.up_proj(values)
        assert (activation.abs() <= activation_threshold).float().mean().item() == pytest.approx(sparsity, abs=0.01)
        decoded = torch.cat(decode_inputs[layer])
        assert (decoded == 0).float().mean().item() == pytest.approx(sparsity, abs=0.2)  # held-out tokens

    def thresholded(mlp, thresholds):
        def forward(hidden):
            out_dense = mlp.down_proj(mlp.act_fn(mlp.gate_proj(hidden)) * mlp.up_proj(hidden))
            if hidden.shape[1] != 1:
                return out_dense  # prefill is dense
            x = torch.where(hidden.abs() > thresholds[0], hidden, 0.0)
            a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            return mlp.down_proj(torch.where(a.abs() > thresholds[1], a, 0.0))

        return forward

    mlps = [layer.mlp for layer in language_model.layers]
    thresholds = [teal.thresholds(mlp) for mlp in mlps]
    for mlp, pair in zip(mlps, thresholds):
        mlp.forward = thresholded(mlp, pair)
    try:
        expected_tokens, expected_logits = generate(model, inputs)
    finally:
        for mlp in mlps:
            del mlp.forward
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)


def test_core_infer_equals_core_matching_keeping_every_token(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    settings = dict(rho=0.3, beta=0.5, neuron_layers=[0, 2, 3])
    _, infer_logits, infer = run(model, cm.CoreInfer(**settings), inputs)
    _, matching_logits, matching = run(model, cm.CoreMatching(prune_layer=1, token_budget=1.0, **settings), inputs)
    assert len(kept_visual(matching)) == VISUAL_TOKENS
    assert infer.core_neurons.keys() == matching.core_neurons.keys() == {0, 2, 3}
    for layer, neurons in infer.core_neurons.items():
        assert torch.equal(neurons, matching.core_neurons[layer])
    torch.testing.assert_close(infer_logits, matching_logits, atol=ATOL, rtol=0)


def test_compose_prunes_tokens_and_decodes_with_core_neurons(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    method = cm.compose(cm.FastV(prune_layer=1, token_budget=8), cm.CoreInfer(beta=0.5, neuron_layers=[1, 2, 3]))
    tokens, logits, record = run(model, method, inputs)
    _, _, alone = run(model, cm.FastV(prune_layer=1, token_budget=8), inputs)
    assert kept_visual(record) == kept_visual(alone)
    assert sorted(record.core_neurons) == [1, 2, 3]
    expected_tokens, expected_logits = oracle_generate(model, record, inputs, neurons=True)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    text_only = dict(input_ids=torch.arange(3, 12).unsqueeze(0))
    with cm.sparsify(model, method) as session:
        generate(model, text_only)
    assert session.last.prune_layer is None and sorted(session.last.core_neurons) == [1, 2, 3]


@pytest.mark.parametrize(
    "method",
    [
        cm.TEAL(sparsity=0.5),
        cm.compose(cm.DivPrune(token_budget=6), cm.TEAL(sparsity=0.5)),
        cm.compose(cm.FastV(prune_layer=1, token_budget=6), cm.CoreInfer(beta=0.5, neuron_layers=[1, 2, 3])),
    ],
    ids=["teal", "divprune+teal", "fastv+coreinfer"],
)
def test_neuron_methods_and_compositions_are_batch_invariant(tiny_llava, method):
    model = tiny_llava()
    with cm.sparsify(model, method) as session:  # TEAL's thresholds, calibrated once before the batches
        if session.engine.decode_ffn_layers:
            session.calibrate(**inputs_of(build_prompt(4, 6, seed=9), build_pixels(1, seed=9)))
    batch, alone = batch_and_alone(model, method, PROMPTS, build_pixels(2, seed=6))
    check_batch_equals_alone(batch, alone, PROMPTS)


# ---------------------------------------------------------------------------------------------- settings, public names


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: cm.FastV(token_budget=0), "token_budget"),
        (lambda: cm.FastV(prune_layer=-1), "prune_layer"),
        (lambda: cm.PDrop(schedule=()), "schedule"),
        (lambda: cm.PDrop(schedule=[(2, 1.5)]), "schedule ratio"),
        (lambda: cm.VisionZip(dominant=0), "dominant"),
        (lambda: cm.VisionZip(contextual=-1), "contextual"),
        (lambda: cm.DART(pivots=0), "pivots"),
        (lambda: cm.DART(token_budget=None), "token_budget"),
        (lambda: cm.DART(text_pivots=-1), "text_pivots"),
        (lambda: cm.DivPrune(prune_layer=-2), "prune_layer"),
        (lambda: cm.CDPruner(token_budget=2.0), "token_budget"),
        (lambda: cm.TEAL(sparsity=1.0), "sparsity"),
        (lambda: cm.TEAL(sparsity=0), "sparsity"),
        (lambda: cm.compose(cm.CoreInfer(), cm.TEAL()), "token_method"),
        (lambda: cm.compose(cm.FastV(), cm.DivPrune()), "neuron_method"),
    ],
)
def test_bad_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


class KeepBrightest(cm.SparsityMethod):
    """The README's example of a user method: keep each image's tokens with the largest input-embedding norm."""

    def __init__(self, token_budget=8):
        self.token_budget = token_budget

    def prune_layer_index(self):
        return -1  # before the language model

    def wants_inputs(self):
        return frozenset({"input_embeddings"})

    def select_tokens(self, batch: cm.TokenBatch) -> cm.TokenDecision:
        scores = batch.input_embeddings.norm(dim=-1)
        keep = cm.selection.select_by_score(scores, batch.image_index, self.token_budget)
        return cm.TokenDecision(keep_visual=keep & batch.visual_mask, scores=scores)


def test_a_user_method_from_public_names(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    tokens, logits, record = run(model, KeepBrightest(), inputs)
    norms = hidden_entering(model, inputs, 0).norm(dim=-1)
    assert kept_visual(record) == top_visual(norms, visual_positions(inputs["input_ids"][0]), 8)
    expected_tokens, expected_logits = oracle_generate(model, record, inputs)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)


def test_inputs_a_layer_cannot_provide_are_refused(tiny_llava):
    class Confused(KeepBrightest):
        def wants_inputs(self):
            return frozenset({"hidden_states"})

    with pytest.raises(ValueError, match="need a prune layer >= 0"):
        cm.sparsify(tiny_llava(), Confused())
