"""The engine inside real transformers forward passes, against independent references (tests/reference.py)."""

import pytest
import torch
from reference import dense_activations, naive_core_matching_keep, naive_sentence_core, reference_run
from tiny_llava import IMAGE_TOKEN, VISUAL_TOKENS, build_pixels, build_prompt, left_pad

import corematching as cm

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
ATOL = 1e-5


def generate(model, inputs, use_cache=True, steps=STEPS):
    """Greedy generation: (sequences [B, T + steps], raw logits [B, steps, V])."""
    out = model.generate(
        **inputs,
        max_new_tokens=steps,
        do_sample=False,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
        suppress_tokens=[IMAGE_TOKEN],  # a generated image token would need image features
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def positions(inputs, visual: bool):
    ids = inputs["input_ids"][0]
    return ((ids == IMAGE_TOKEN) == visual).nonzero().flatten().tolist()


@pytest.fixture(params=["sdpa", "eager"])
def attn(request):
    return request.param


@pytest.fixture(params=[True, False], ids=["cache", "no_cache"])
def use_cache(request):
    return request.param


# ---------------------------------------------------------------------------------------------- keep-all


@pytest.mark.parametrize("neuron_layers", [None, [0, 1, 2, 3]])
def test_keep_all_equals_dense(tiny_llava, single_inputs, attn, use_cache, neuron_layers):
    model, inputs = tiny_llava(attn), single_inputs()
    dense_tokens, dense_logits = generate(model, inputs, use_cache)
    method = cm.CoreMatching(prune_layer=1, token_budget=VISUAL_TOKENS, beta=1.0, neuron_layers=neuron_layers)
    with cm.sparsify(model, method) as session:
        tokens, logits = generate(model, inputs, use_cache)
        kept = session.last.kept_positions[0]
    # without a cache every step is a fresh prefill of the sequence so far, and session.last describes the last one
    prefill_length = inputs["input_ids"].shape[1] + (0 if use_cache else STEPS - 1)
    assert kept.tolist() == list(range(prefill_length))
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- token removal


def test_kept_tokens_follow_the_core_matching_rule(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs(text_before=4, text_after=6)
    activations = dense_activations(model, inputs)
    visual, text = positions(inputs, True), positions(inputs, False)
    cases = [
        dict(prune_layer=1, token_budget=8, match="text"),
        dict(prune_layer=0, token_budget=0.25, match="all"),
        dict(prune_layer=2, token_budget=5, match="last"),
        dict(prune_layer=1, token_budget=None, match="text"),
    ]
    for case in cases:
        method = cm.CoreMatching(rho=0.3, beta=0.4, **case)
        with cm.sparsify(model, method) as session:
            model(**inputs)
            kept = session.last.kept_positions[0].tolist()
        match = {"text": text, "all": text + visual, "last": [len(text) + len(visual) - 1]}[case["match"]]
        expected_visual = naive_core_matching_keep(
            activations[case["prune_layer"]][0], visual, sorted(match), 0.3, 0.4, case["token_budget"]
        )
        assert kept == sorted(text + expected_visual), case


def test_token_removal_matches_the_gathered_reference(tiny_llava, single_inputs, attn):
    model, inputs = tiny_llava(attn), single_inputs()
    prune_layer = 1
    with cm.sparsify(model, cm.CoreMatching(prune_layer=prune_layer, token_budget=8, beta=1.0)) as session:
        tokens, logits = generate(model, inputs)
        record = session.last
    prompt_length = inputs["input_ids"].shape[1]
    kept = record.kept_positions[0]
    assert len(kept) == prompt_length - VISUAL_TOKENS + 8
    for step in range(STEPS):
        expected, _ = reference_run(
            model, tokens[:, : prompt_length + step], inputs["pixel_values"], prune_layer, kept, prompt_length
        )
        torch.testing.assert_close(logits[0, step], expected, atol=ATOL, rtol=0)


def test_budget_larger_than_the_image_keeps_every_token(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    dense_tokens, dense_logits = generate(model, inputs)
    with cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=1000, beta=1.0)) as session:
        tokens, logits = generate(model, inputs)
        assert len(session.last.kept_positions[0]) == inputs["input_ids"].shape[1]
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- core neurons


@pytest.mark.parametrize("neuron_layers", [[2, 3], [0, 1, 2, 3]])
def test_core_neuron_decoding_matches_the_zeroed_reference(tiny_llava, single_inputs, attn, neuron_layers):
    model, inputs = tiny_llava(attn), single_inputs()
    prune_layer, rho, beta = 1, 0.2, 0.5
    method = cm.CoreMatching(prune_layer=prune_layer, token_budget=8, rho=rho, beta=beta, neuron_layers=neuron_layers)
    with cm.sparsify(model, method) as session:
        tokens, logits = generate(model, inputs)
        record = session.last
    prompt_length = inputs["input_ids"].shape[1]
    kept, core = record.kept_positions[0], record.core_neurons
    expected_layers = neuron_layers
    assert sorted(core) == expected_layers
    width = model.config.text_config.intermediate_size
    assert all(len(neurons) == int(beta * width) for neurons in core.values())

    # The core neurons are C_beta of the tokens present at each layer during prefill.
    _, prefill_activations = reference_run(model, inputs["input_ids"], inputs["pixel_values"], prune_layer, kept)
    dense = dense_activations(model, inputs)
    for layer, neurons in core.items():
        if layer <= prune_layer:
            acts, tokens_at_layer = dense[layer][0], list(range(prompt_length))
        else:
            acts, tokens_at_layer = prefill_activations[layer][0], list(range(len(kept)))
        assert neurons.tolist() == naive_sentence_core(acts, tokens_at_layer, rho, beta), layer

    # Prefill is dense; every generated token uses FFNs zeroed outside the core neurons.
    for step in range(STEPS):
        expected, _ = reference_run(
            model, tokens[:, : prompt_length + step], inputs["pixel_values"], prune_layer, kept, prompt_length, core
        )
        torch.testing.assert_close(logits[0, step], expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- batching


def batch_and_alone(model, method, prompts, pixels, use_cache=True):
    """Run the prompts as one left-padded batch and one by one; return both runs' results."""
    input_ids, attention_mask = left_pad(prompts)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
    with cm.sparsify(model, method) as session:
        batch_tokens, batch_logits = generate(model, batch, use_cache)
        batch_record = session.last
        alone = []
        image = 0
        for prompt in prompts:
            has_image = bool((prompt == IMAGE_TOKEN).any())
            inputs = dict(input_ids=prompt.unsqueeze(0), attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
            if has_image:
                inputs["pixel_values"] = pixels[image : image + 1]
                image += 1
            tokens, logits = generate(model, inputs, use_cache)
            alone.append((tokens, logits, session.last))
    return (batch_tokens, batch_logits, batch_record), alone


def check_batch_equals_alone(batch, alone, prompts):
    batch_tokens, batch_logits, batch_record = batch
    width = max(len(p) for p in prompts)
    for row, (prompt, (tokens, logits, record)) in enumerate(zip(prompts, alone)):
        offset = width - len(prompt)
        assert torch.equal(batch_tokens[row, offset:], tokens[0])
        torch.testing.assert_close(batch_logits[row], logits[0], atol=1e-4, rtol=0)
        assert torch.equal(batch_record.kept_positions[row] - offset, record.kept_positions[0])
        per_sample = batch_record.core_neurons_per_sample[row]
        assert per_sample.keys() == record.core_neurons.keys()
        for layer, neurons in record.core_neurons.items():
            assert torch.equal(per_sample[layer], neurons)


PROMPTS = [build_prompt(2, 3, seed=1), build_prompt(6, 9, seed=2)]


def test_left_padded_batch_equals_each_sample_alone(tiny_llava, attn, use_cache):
    model = tiny_llava(attn)
    method = cm.CoreMatching(prune_layer=1, token_budget=6, beta=0.5, neuron_layers=[0, 1, 2, 3])
    batch, alone = batch_and_alone(model, method, PROMPTS, build_pixels(2, seed=5), use_cache)
    check_batch_equals_alone(batch, alone, PROMPTS)
    kept = batch[2].kept_positions
    assert len(kept[0]) != len(kept[1])  # the samples keep different numbers of tokens


@pytest.mark.parametrize(
    "method",
    [
        cm.CoreMatching(prune_layer=0, token_budget=None, beta=0.6, match="last"),
        cm.CoreMatching(prune_layer=2, token_budget=0.3, rho=0.5, beta=0.3, match="all"),
        cm.RandomTokens(token_budget=5, seed=1, prune_layer=1),
        cm.UniformTokens(token_budget=9, prune_layer=2),
        cm.Dense(),
    ],
    ids=["adaptive-last", "fraction-all", "random", "uniform", "dense"],
)
def test_batch_equals_alone_for_every_method(tiny_llava, method):
    model = tiny_llava()
    batch, alone = batch_and_alone(model, method, PROMPTS, build_pixels(2, seed=6))
    check_batch_equals_alone(batch, alone, PROMPTS)


def test_batch_with_a_text_only_sample(tiny_llava):
    model = tiny_llava()
    text_only = torch.tensor([1, 5, 9, 17, 33, 4, 8])
    prompts = [PROMPTS[1], text_only]
    method = cm.CoreMatching(prune_layer=1, token_budget=4, beta=0.5)
    batch, alone = batch_and_alone(model, method, prompts, build_pixels(1, seed=7))
    check_batch_equals_alone(batch, alone, [p for p in prompts])
    dense_tokens, _ = generate(model, dict(input_ids=text_only.unsqueeze(0)))
    assert torch.equal(alone[1][0], dense_tokens)


# ---------------------------------------------------------------------------------------------- dense inputs


def test_inputs_without_image_run_dense(tiny_llava):
    model = tiny_llava()
    inputs = dict(input_ids=torch.tensor([[1, 5, 9, 17, 33, 4, 8]]))
    dense_tokens, dense_logits = generate(model, inputs)
    with cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=4, beta=0.3)) as session:
        tokens, logits = generate(model, inputs)
        record = session.last
    assert torch.equal(tokens, dense_tokens)
    assert torch.equal(logits, dense_logits)
    assert record.kept_positions[0].tolist() == list(range(7))
    assert record.core_neurons == {}


def test_image_token_and_feature_mismatch_raises_the_models_error(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    ids = inputs.pop("input_ids")
    inputs["input_ids"] = torch.cat([ids[:, :10], ids[:, 13:]], dim=1)  # three image tokens fewer
    inputs.pop("attention_mask")
    with pytest.raises(Exception) as dense_error:
        model(**inputs)
    with cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=4)):
        with pytest.raises(type(dense_error.value)) as error:
            model(**inputs)
    assert str(error.value) == str(dense_error.value)


def test_plain_forward_returns_logits_of_the_kept_tokens(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    with cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=8)) as session:
        logits = model(**inputs).logits
        kept = session.last.kept_positions[0]
    assert logits.shape[1] == len(kept)
    expected, _ = reference_run(model, inputs["input_ids"], inputs["pixel_values"], 1, kept)
    torch.testing.assert_close(logits[0, -1], expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- other inputs


def test_generation_without_a_cache_prefills_afresh_at_every_step(tiny_llava, single_inputs, attn):
    """use_cache=False: each step is a fresh prefill of the sequence so far (the method chooses again), so each
    step's logits are those of a plain forward of that sequence, which the gathered reference checks."""
    model, inputs = tiny_llava(attn), single_inputs()
    method = cm.CoreMatching(prune_layer=1, token_budget=8, beta=0.5, neuron_layers=[2, 3])
    with cm.sparsify(model, method) as session:
        tokens, logits = generate(model, inputs, use_cache=False)
        prompt_length = inputs["input_ids"].shape[1]
        for step in range(STEPS):
            sequence = tokens[:, : prompt_length + step]
            out = model(input_ids=sequence, pixel_values=inputs["pixel_values"], use_cache=False)
            kept = session.last.kept_positions[0]
            torch.testing.assert_close(logits[0, step], out.logits[0, -1], atol=ATOL, rtol=0)
            expected, _ = reference_run(model, sequence, inputs["pixel_values"], 1, kept)
            torch.testing.assert_close(out.logits[0, -1], expected, atol=ATOL, rtol=0)


def test_a_forward_after_another_is_a_fresh_prefill(tiny_llava, single_inputs):
    """Likelihood scoring: model(prompt) then model(prompt + answer) gives what a fresh session gives for the
    second, and session.last describes the second."""
    model, inputs = tiny_llava(), single_inputs()
    answer = torch.tensor([[7, 8, 9]])
    longer = dict(inputs, input_ids=torch.cat([inputs["input_ids"], answer], 1), attention_mask=None)
    method = cm.CoreMatching(prune_layer=1, token_budget=8, beta=0.5)
    with cm.sparsify(model, method) as session:
        fresh = model(**longer).logits
        fresh_kept = session.last.kept_positions[0]
    with cm.sparsify(model, method) as session:
        model(**inputs)
        first_kept = session.last.kept_positions[0]
        second = model(**longer).logits
        assert torch.equal(session.last.kept_positions[0], fresh_kept)
    assert len(fresh_kept) == len(first_kept) + 3
    torch.testing.assert_close(second, fresh, atol=0, rtol=0)


def test_inputs_embeds_find_the_visual_tokens(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=8, beta=0.5)) as session:
        by_ids = model(**inputs).logits
        kept_by_ids = session.last.kept_positions[0]
        by_embeds = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"]).logits
        kept_by_embeds = session.last.kept_positions[0]
    assert torch.equal(kept_by_ids, kept_by_embeds)
    torch.testing.assert_close(by_embeds, by_ids, atol=ATOL, rtol=0)


def test_each_image_of_a_sample_keeps_its_own_budget(tiny_llava):
    model = tiny_llava()
    first, second = build_prompt(2, 3, seed=3), build_prompt(0, 4, seed=4)
    prompt = torch.cat([first, second[1:]]).unsqueeze(0)  # two images in one sample
    inputs = dict(input_ids=prompt, pixel_values=build_pixels(2, seed=8))
    with cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=5)) as session:
        model(**inputs)
        kept_visual = session.last.kept_visual_positions[0]
    visual = (prompt[0] == IMAGE_TOKEN).nonzero().flatten()
    first_image, second_image = visual[:VISUAL_TOKENS], visual[VISUAL_TOKENS:]
    assert int(torch.isin(kept_visual, first_image).sum()) == 5
    assert int(torch.isin(kept_visual, second_image).sum()) == 5
