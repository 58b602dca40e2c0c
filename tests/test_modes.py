"""Every way of calling the model under a session is exact against the oracle (tests/oracle.py) or refused with an
error that names the mode: caches, conversations, generation modes, weights."""

import copy
import math

import pytest
import torch
from oracle import masked_reference, removed_mask
from tiny_llava import IMAGE_TOKEN, VISUAL_TOKENS, build_pixels, build_prompt, build_tiny_llava, left_pad
from torch import nn

import corematching as cm

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
STEPS = 4
PRUNE_LAYER = 1
NEURON_LAYERS = [0, 2, 3]


def method(neurons: bool = True):
    return cm.CoreMatching(
        prune_layer=PRUNE_LAYER, token_budget=8, beta=0.5, neuron_layers=NEURON_LAYERS if neurons else []
    )


def generate(model, inputs, **options):
    options = {"max_new_tokens": STEPS, "do_sample": False, **options}
    out = model.generate(
        **inputs, output_logits=True, return_dict_in_generate=True, suppress_tokens=[IMAGE_TOKEN], **options
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def oracle(model, record, length: int, decode_from: int, attn: str = "sdpa", offset_records=()):
    """The oracle for a record (plus records of later turns: (record, offset) pairs), every prune stage's removed
    tokens blocked after its layer."""
    stages = record.stage_keep_masks if record.prune_layer is not None else {}
    removed = {layer: removed_mask(keep, record.visual_mask, length) for layer, keep in stages.items()}
    for later, offset in offset_records:
        width = later.keep_mask.shape[1]
        for layer, keep in later.stage_keep_masks.items():
            removed[layer][:, offset : offset + width] |= later.visual_mask & ~keep
    language_model = model.model.language_model
    ffns = {layer: language_model.layers[layer].mlp for layer in record.neurons}
    return masked_reference(language_model, ffns, removed, None, record.core_neurons_per_sample, decode_from, attn)


def inputs_of(prompt: torch.Tensor, pixels: torch.Tensor | None = None):
    inputs = {"input_ids": prompt.unsqueeze(0), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
    if pixels is not None:
        inputs["pixel_values"] = pixels
    return inputs


def assert_matches_oracle(model, inputs, options, attn="sdpa", neurons=True):
    with cm.sparsify(model, method(neurons)) as session:
        tokens, logits = generate(model, inputs, **options)
        record = session.last
    length = inputs["input_ids"].shape[1]
    with oracle(model, record, length + STEPS, length, attn):
        expected_tokens, expected_logits = generate(model, inputs, **options)
    assert torch.equal(tokens, expected_tokens)
    return tokens, logits, expected_logits, record


# ---------------------------------------------------------------------------------------------- the oracle itself


def test_the_oracle_with_nothing_removed_is_the_dense_model(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    dense_tokens, dense_logits = generate(model, inputs)
    removed = torch.zeros(1, 100, dtype=torch.bool)
    with masked_reference(model.model.language_model, {}, removed, PRUNE_LAYER):
        tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- generation modes


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_equals_the_oracle(tiny_llava, single_inputs, attn):
    model, inputs = tiny_llava(attn), single_inputs()
    _, logits, expected, record = assert_matches_oracle(model, inputs, {}, attn)
    assert len(record.kept_visual_positions[0]) == 8 and sorted(record.core_neurons) == NEURON_LAYERS
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_sampling_with_a_seed_equals_the_oracle(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    options = {"do_sample": True, "temperature": 1.5, "top_k": 0, "max_new_tokens": 6}
    torch.manual_seed(3)
    with cm.sparsify(model, method()) as session:
        tokens, _ = generate(model, inputs, **options)
        record = session.last
    length = inputs["input_ids"].shape[1]
    torch.manual_seed(3)
    with oracle(model, record, length + 6, length):
        expected, _ = generate(model, inputs, **options)
    assert torch.equal(tokens, expected)


def test_beam_search_equals_the_oracle(tiny_llava):
    model = tiny_llava()
    prompts = [build_prompt(2, 3, seed=1), build_prompt(6, 9, seed=2)]
    input_ids, attention_mask = left_pad(prompts)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=build_pixels(2, seed=5))
    options = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 5}
    with cm.sparsify(model, method()) as session:
        tokens, _ = generate(model, inputs, **options)
        record = session.last
    length = input_ids.shape[1]
    with oracle(model, record, length + 5, length):
        expected, _ = generate(model, inputs, **options)
    assert torch.equal(tokens, expected)


def test_static_cache_equals_the_oracle(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    _, logits, expected, _ = assert_matches_oracle(model, inputs, {"cache_implementation": "static"})
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_a_quantized_cache_is_refused(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    options = {"cache_implementation": "quantized", "cache_config": {"backend": "fp8"}}
    with cm.sparsify(model, method()), pytest.raises(cm.UnsupportedModeError, match="quantized KV cache"):
        generate(model, inputs, **options)


def test_layers_dispatched_by_accelerate_equal_the_oracle(single_inputs):
    """A model placed with a device map (accelerate's hooks on every layer move inputs to the layer's device)."""
    from accelerate import dispatch_model

    model = build_tiny_llava(num_layers=4, seed=4)
    names = ["model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens",
             "model.language_model.norm", "model.language_model.rotary_emb", "lm_head"]
    device_map = {name: "cpu" for name in names}
    device_map.update({f"model.language_model.layers.{i}": "cpu" for i in range(4)})
    model = dispatch_model(model, device_map=device_map, force_hooks=True)
    assert hasattr(model.model.language_model.layers[2], "_hf_hook")
    _, logits, expected, _ = assert_matches_oracle(model, single_inputs(), {})
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_assisted_decoding_equals_the_oracle(tiny_llava):
    """Prompt lookup proposes several tokens at once; the model verifies them in one call and the cache is
    cropped back where they were rejected. A repetitive prompt makes proposals happen."""
    model = tiny_llava()
    prompt = torch.cat([build_prompt(3, 0, seed=9), torch.tensor([5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6])])
    inputs = inputs_of(prompt, build_pixels(1, seed=9))
    options = {"prompt_lookup_num_tokens": 3, "max_new_tokens": 8}
    with cm.sparsify(model, method()) as session:
        greedy = model.generate(**inputs, do_sample=False, suppress_tokens=[IMAGE_TOKEN], max_new_tokens=8)
        tokens = model.generate(**inputs, do_sample=False, suppress_tokens=[IMAGE_TOKEN], **options)
        record = session.last
    assert torch.equal(tokens, greedy)  # the first call's candidates change no decision
    length = prompt.shape[0]
    with oracle(model, record, length + 8, length):
        expected = model.generate(**inputs, do_sample=False, suppress_tokens=[IMAGE_TOKEN], max_new_tokens=8)
    assert torch.equal(tokens, expected)


def test_torch_compile_is_refused(tiny_llava):
    compiled = torch.compile(tiny_llava())
    with pytest.raises(cm.UnsupportedModelError, match="torch.compile"):
        cm.sparsify(compiled, method())


def test_a_custom_4d_mask_is_refused(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    length = inputs["input_ids"].shape[1]
    custom = torch.ones(1, 1, length, length, dtype=torch.bool).tril()
    custom[..., 10:, :5] = False  # later queries do not see the first tokens: not a causal padding mask
    inputs["attention_mask"] = custom
    with cm.sparsify(model, method()), pytest.raises(cm.UnsupportedModeError, match="4-D attention mask"):
        model(**inputs)


def test_labels_are_refused(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    with cm.sparsify(model, method()), pytest.raises(cm.UnsupportedModeError, match="labels="):
        model(**inputs, labels=inputs["input_ids"])


# ---------------------------------------------------------------------------------------------- state and caches


@torch.no_grad()
def prefill(model, inputs):
    out = model(**inputs, use_cache=True)
    return out.logits[:, -1], out.cache


@torch.no_grad()
def step(model, token: torch.Tensor, cache, attention_mask):
    out = model(input_ids=token.view(1, 1), attention_mask=attention_mask, cache=cache, use_cache=True)
    return out.logits[:, -1], out.cache


def greedy_steps(model, inputs, cache, first_logits, steps=STEPS):
    """Greedy decoding by hand from a prefilled cache: the logits of each step [steps, V]."""
    mask = inputs["attention_mask"]
    logits, collected = first_logits, []
    for _ in range(steps):
        collected.append(logits[0])
        token = logits.argmax(-1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        logits, cache = step(model, token, cache, mask)
    return torch.stack(collected)


def test_interleaved_conversations_are_each_exact(tiny_llava):
    model = tiny_llava()
    first = inputs_of(build_prompt(2, 4, seed=11), build_pixels(1, seed=11))
    second = inputs_of(build_prompt(5, 3, seed=12), build_pixels(1, seed=12))
    with cm.sparsify(model, method()) as session:
        logits_a, cache_a = prefill(model, first)
        record_a = session.last
        logits_b, cache_b = prefill(model, second)
        record_b = session.last
        # one step each, alternating, then the rest of the first
        mask_a = torch.cat([first["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
        mask_b = torch.cat([second["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
        next_a, cache_a = step(model, logits_a.argmax(-1), cache_a, mask_a)
        next_b, cache_b = step(model, logits_b.argmax(-1), cache_b, mask_b)
    for inputs, record, first_logits, second_logits in (
        (first, record_a, logits_a, next_a),
        (second, record_b, logits_b, next_b),
    ):
        length = inputs["input_ids"].shape[1]
        with oracle(model, record, length + 2, length):
            expected = generate(model, inputs, max_new_tokens=2)[1][0]
        torch.testing.assert_close(first_logits[0], expected[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(second_logits[0], expected[1], atol=ATOL, rtol=0)


def test_copies_of_a_prefilled_cache_continue_like_the_original(tiny_llava):
    """Prefix caching: one image prefilled once; two different questions continued from deep copies."""
    model = tiny_llava()
    image_prefix = build_prompt(2, 0, seed=13)
    inputs = inputs_of(image_prefix, build_pixels(1, seed=13))
    questions = [torch.tensor([[11, 12, 13]]), torch.tensor([[21, 22, 23, 24]])]
    results = []
    with cm.sparsify(model, method()) as session:
        _, cache = prefill(model, inputs)
        record = session.last
        for question in questions:
            copied = copy.deepcopy(cache)
            mask = torch.ones(1, len(image_prefix) + question.shape[1], dtype=torch.long)
            with torch.no_grad():
                out = model(input_ids=question, attention_mask=mask, cache=copied, use_cache=True)
            results.append(greedy_steps(model, {"attention_mask": mask}, out.cache, out.logits[:, -1], steps=3))
        assert session.last is record  # continuing is not a new prefill
        assert cache.get_seq_length() == len(image_prefix)  # the original is untouched
    for question, logits in zip(questions, results):
        full = inputs_of(torch.cat([image_prefix, question[0]]), inputs["pixel_values"])
        length = full["input_ids"].shape[1]
        with oracle(model, record, length + 3, len(image_prefix)):
            expected = generate(model, full, max_new_tokens=3)[1][0]
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_a_second_turn_with_a_new_image_is_exact(tiny_llava):
    model = tiny_llava()
    turn_one = build_prompt(2, 3, seed=14)
    turn_two = build_prompt(0, 4, seed=15)[1:]  # a new image and new text, no BOS
    pixels = build_pixels(2, seed=14)
    with cm.sparsify(model, method(neurons=False)) as session:
        _, cache = prefill(model, inputs_of(turn_one, pixels[:1]))
        first = session.last
        mask = torch.ones(1, len(turn_one) + len(turn_two), dtype=torch.long)
        out = model(input_ids=turn_two.unsqueeze(0), pixel_values=pixels[1:], attention_mask=mask, cache=cache)
        second = session.last
        logits = greedy_steps(model, {"attention_mask": mask}, out.cache, out.logits[:, -1], steps=3)
    assert len(second.kept_visual_positions[0]) == 8  # the new image's tokens were chosen too
    full = inputs_of(torch.cat([turn_one, turn_two]), pixels)
    length = full["input_ids"].shape[1]
    with oracle(model, first, length + 3, length, offset_records=[(second, len(turn_one))]):
        expected = generate(model, full, max_new_tokens=3)[1][0]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_a_cache_used_after_remove_raises(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    with cm.sparsify(model, method()):
        logits, cache = prefill(model, inputs)
    mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    with pytest.raises(cm.UnsupportedModeError, match="has been removed"):
        step(model, logits.argmax(-1), cache, mask)


def test_a_cache_of_another_session_raises(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    with cm.sparsify(model, method()):
        logits, cache = prefill(model, inputs)
        copied = copy.deepcopy(cache)
    mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    with cm.sparsify(model, method()), pytest.raises(cm.UnsupportedModeError, match="another corematching session"):
        step(model, logits.argmax(-1), copied, mask)


# ---------------------------------------------------------------------------------------------- neuron-only methods


def test_a_neuron_only_method_decodes_with_its_core_neurons(tiny_llava):
    """CoreInfer prunes no token; its core neurons are used while decoding (also without an image)."""
    model = tiny_llava()
    with_image = inputs_of(build_prompt(3, 4, seed=16), build_pixels(1, seed=16))
    for inputs in (with_image, inputs_of(torch.arange(3, 15), None)):
        dense_tokens, dense_logits = generate(model, inputs)
        with cm.sparsify(model, cm.CoreInfer(beta=0.3, neuron_layers=[1, 2, 3])) as session:
            tokens, logits = generate(model, inputs)
            record = session.last
        assert sorted(record.core_neurons) == [1, 2, 3]
        length = inputs["input_ids"].shape[1]
        language_model = model.model.language_model
        ffns = {layer: language_model.layers[layer].mlp for layer in record.neurons}
        removed = torch.zeros(1, length + STEPS, dtype=torch.bool)
        with masked_reference(language_model, ffns, removed, None, record.core_neurons_per_sample, length):
            expected_tokens, expected = generate(model, inputs)
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[:, 0], dense_logits[:, 0], atol=ATOL, rtol=0)  # the prefill is dense
        assert not torch.allclose(logits[:, 1:], dense_logits[:, 1:], atol=1e-3)  # decoding is not


# ---------------------------------------------------------------------------------------------- batches and memory


def test_one_sliced_copy_serves_the_whole_batch(tiny_llava):
    model = tiny_llava()
    prompts = [build_prompt(2 + i, 3 + i, seed=20 + i) for i in range(4)]
    input_ids, attention_mask = left_pad(prompts)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=build_pixels(4, seed=20))
    with cm.sparsify(model, method()) as session:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config.get_text_config())  # the slices live as long as the cache
        tokens, logits = generate(model, inputs, cache=cache)
        record = session.last
        sliced = [per_layer for _, per_layer in session.engine._sliced.values()]
        alone = []
        for row, prompt in enumerate(prompts):
            alone.append(generate(model, inputs_of(prompt, inputs["pixel_values"][row : row + 1])))
    assert len(sliced) == 1
    width = model.config.text_config.intermediate_size
    hidden = model.config.text_config.hidden_size
    one_ffn = 3 * width * hidden * 4  # bytes of one layer's gate, up, down in fp32
    assert sorted(sliced[0]) == NEURON_LAYERS  # every neuron layer decoded from one FFN for the whole batch
    for layer, ffn in sliced[0].items():
        union = torch.unique(record.neurons[layer]).numel()
        assert ffn is not None  # (None: the layer fell back to the dense FFN, as only beta 1 may)
        assert ffn.up.shape[0] == union
        assert ffn.extra_bytes <= one_ffn + 4 * width  # never one copy per sample
    for row, (alone_tokens, alone_logits) in enumerate(alone):
        offset = input_ids.shape[1] - len(prompts[row])
        assert torch.equal(tokens[row, offset:], alone_tokens[0])
        torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_matches_the_oracle(single_inputs, dtype, atol):
    """Half precision: the same tokens as the oracle; logits within atol (rounding differs in the sliced FFN)."""
    model = build_tiny_llava(num_layers=4, seed=1).to(dtype)
    inputs = single_inputs()
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    _, logits, expected, _ = assert_matches_oracle(model, inputs, {})
    torch.testing.assert_close(logits.float(), expected.float(), atol=atol, rtol=0)


def test_ffn_biases_are_sliced(single_inputs):
    model = build_tiny_llava(num_layers=4, seed=2, mlp_bias=True)
    assert model.model.language_model.layers[0].mlp.up_proj.bias is not None
    _, logits, expected, _ = assert_matches_oracle(model, single_inputs(), {})
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


class Linear8bit(nn.Linear):
    """Stands for a quantized linear module (bitsandbytes' Linear8bitLt subclasses nn.Linear the same way)."""


def test_quantized_ffn_modules_refuse_neuron_decoding_but_allow_token_pruning(single_inputs):
    model = build_tiny_llava(num_layers=4, seed=3)
    mlp = model.model.language_model.layers[2].mlp
    quantized = Linear8bit(mlp.gate_proj.in_features, mlp.gate_proj.out_features, bias=False)
    quantized.weight = mlp.gate_proj.weight
    mlp.gate_proj = quantized
    with pytest.raises(cm.UnsupportedModelError, match="layer 2.*gate projection is a .*Linear8bit module"):
        cm.sparsify(model, method())
    with cm.sparsify(model, method(neurons=False)) as session:
        model(**single_inputs())
        assert len(session.last.kept_visual_positions[0]) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_the_oracle_and_reports_memory(single_inputs):
    model = build_tiny_llava(num_layers=4, seed=1).to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda") for k, v in single_inputs().items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    _, logits, expected, _ = assert_matches_oracle(model, inputs, {})
    torch.testing.assert_close(logits.float(), expected.float(), atol=0.05, rtol=0)
    print("max_memory_allocated", torch.cuda.max_memory_allocated())


# ---------------------------------------------------------------------------------------------- several prune stages


def staged():
    """Two prune stages (after layers 0 and 2) with core-neuron decoding on layers 1 and 3."""
    return cm.compose(cm.PDrop(schedule=((0, 0.6), (2, 0.5))), cm.CoreInfer(beta=0.5, neuron_layers=[1, 3]))


@pytest.mark.parametrize(
    "options",
    [{}, {"cache_implementation": "static"}, {"num_beams": 3, "num_return_sequences": 2}],
    ids=["greedy", "static", "beams"],
)
def test_several_prune_stages_equal_the_oracle(tiny_llava, options):
    model = tiny_llava()
    input_ids, attention_mask = left_pad([build_prompt(2, 3, seed=1), build_prompt(6, 9, seed=2)])
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=build_pixels(2, seed=5))
    with cm.sparsify(model, staged()) as session:
        tokens, logits = generate(model, inputs, **options)
        record = session.last
    assert sorted(record.stage_keep_masks) == [0, 2]
    assert (record.stage_keep_masks[2] & ~record.stage_keep_masks[0]).sum() == 0  # stage 2 keeps a subset
    length = input_ids.shape[1]
    with oracle(model, record, length + STEPS, length):
        expected_tokens, expected_logits = generate(model, inputs, **options)
    assert torch.equal(tokens, expected_tokens)
    if not options:
        torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)


def test_several_prune_stages_with_assisted_decoding_equal_the_oracle(tiny_llava):
    model = tiny_llava()
    prompt = torch.cat([build_prompt(3, 0, seed=9), torch.tensor([5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6])])
    inputs = inputs_of(prompt, build_pixels(1, seed=9))
    with cm.sparsify(model, staged()) as session:
        tokens = model.generate(
            **inputs, do_sample=False, suppress_tokens=[IMAGE_TOKEN], prompt_lookup_num_tokens=3, max_new_tokens=8
        )
        record = session.last
    with oracle(model, record, len(prompt) + 8, len(prompt)):
        expected = model.generate(**inputs, do_sample=False, suppress_tokens=[IMAGE_TOKEN], max_new_tokens=8)
    assert torch.equal(tokens, expected)


def test_several_prune_stages_over_turns_and_cache_copies(tiny_llava):
    """A second turn brings a new image (its tokens go through both stages too), continued from a deep copy."""
    model = tiny_llava()
    turn_one = build_prompt(2, 3, seed=14)
    turn_two = build_prompt(0, 4, seed=15)[1:]
    pixels = build_pixels(2, seed=14)
    method = cm.PDrop(schedule=((0, 0.6), (2, 0.5)))
    with cm.sparsify(model, method) as session:
        _, cache = prefill(model, inputs_of(turn_one, pixels[:1]))
        first = session.last
        copied = copy.deepcopy(cache)
        mask = torch.ones(1, len(turn_one) + len(turn_two), dtype=torch.long)
        out = model(input_ids=turn_two.unsqueeze(0), pixel_values=pixels[1:], attention_mask=mask, cache=copied)
        second = session.last
        logits = greedy_steps(model, {"attention_mask": mask}, out.cache, out.logits[:, -1], steps=3)
    assert cache.get_seq_length() == len(turn_one)  # the original is untouched
    expected_kept = math.ceil(0.5 * math.ceil(0.6 * VISUAL_TOKENS))  # of the new image, after both stages
    assert len(second.kept_visual_positions[0]) == expected_kept
    full = inputs_of(torch.cat([turn_one, turn_two]), pixels)
    length = full["input_ids"].shape[1]
    with oracle(model, first, length + 3, length, offset_records=[(second, len(turn_one))]):
        expected = generate(model, full, max_new_tokens=3)[1][0]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
