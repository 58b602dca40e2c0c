"""Core-neuron decoding with the FFN neurons reordered in place (`neuron_weights="in_place"`): the same results as
the gathered copy and the oracle, no weights copied, and the model's parameters given back bit for bit."""

import copy
import gc
import weakref

import pytest
import torch
from oracle import masked_reference, removed_mask
from test_baselines import generate as greedy_with_logits
from test_modes import inputs_of
from tiny_llava import build_pixels, build_prompt, build_tiny_llava, left_pad
from transformers import DynamicCache

import corematching as cm
from corematching.runtime import core_decoding as decoding_module
from corematching.runtime import neuron_order

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
STEPS = 4
PRUNE_LAYER = 1
NEURON_LAYERS = [0, 1, 2, 3]


def method():
    return cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=8, beta=0.5, neuron_layers=NEURON_LAYERS)


def generate(model, inputs, steps=STEPS, cache=None):
    """Greedy tokens and logits; with `cache`, into that KV cache (which keeps the conversation alive)."""
    return greedy_with_logits(model, inputs if cache is None else {**inputs, "cache": cache}, steps)


def new_cache(model):
    return DynamicCache(config=model.config.get_text_config())


def batch_inputs(prompts, pixels):
    input_ids, attention_mask = left_pad(prompts)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels}


def snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [name for name, tensor in after.items() if not torch.equal(tensor, before[name])]
    assert not changed, changed


def sliced_ffns(session):
    return [ffn for _, per_layer in session.engine._sliced.values() for ffn in per_layer.values() if ffn is not None]


INPUTS = {
    "batch-1": lambda: inputs_of(build_prompt(3, 5, seed=0), build_pixels(1, seed=0)),
    "padded-batch-2": lambda: batch_inputs(
        [build_prompt(2, 3, seed=1), build_prompt(6, 9, seed=2)], build_pixels(2, seed=5)
    ),
}


@pytest.mark.parametrize("which", list(INPUTS))
def test_in_place_decoding_equals_the_copy_and_the_oracle(tiny_llava, which):
    model, inputs = tiny_llava(), INPUTS[which]()
    before = snapshot(model)
    results = {}
    for weights in ("copy", "in_place"):
        with cm.sparsify(model, method(), neuron_weights=weights) as session:
            cache = new_cache(model)  # alive: its slices stay
            results[weights] = generate(model, inputs, cache=cache)
            record = session.last
            ffns = sliced_ffns(session)
        assert len(ffns) == len(NEURON_LAYERS)
        if weights == "in_place":
            assert all(ffn.weight_bytes == 0 and ffn.swap is not None for ffn in ffns)
        assert_unchanged(model, before)
    tokens, logits = results["in_place"]
    assert torch.equal(tokens, results["copy"][0])
    torch.testing.assert_close(logits, results["copy"][1], atol=ATOL, rtol=0)

    batch, length = inputs["input_ids"].shape
    if batch > 1:  # the samples' core sets differ: each decodes with its own set inside the union
        per_sample = record.core_neurons_per_sample
        assert any(not torch.equal(per_sample[0][layer], per_sample[1][layer]) for layer in NEURON_LAYERS)
        assert all(ffn.row_masks is not None and ffn.row_masks.shape[0] == 2 for ffn in ffns)
    language_model = model.model.language_model
    ffn_modules = {layer: language_model.layers[layer].mlp for layer in record.neurons}
    removed = removed_mask(record.keep_mask, record.visual_mask, length + STEPS)
    with masked_reference(
        language_model, ffn_modules, removed, record.prune_layer, record.core_neurons_per_sample, length
    ):
        expected_tokens, expected = generate(model, inputs)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_a_text_only_sample_in_the_batch_decodes_dense_on_the_reordered_neurons(tiny_llava):
    model = tiny_llava()
    prompts = [build_prompt(2, 3, seed=3), torch.arange(3, 15)]
    input_ids, attention_mask = left_pad(prompts)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": build_pixels(1, seed=3)}
    results = {}
    for weights in ("copy", "in_place"):
        with cm.sparsify(model, method(), neuron_weights=weights):
            results[weights] = generate(model, inputs)
    assert torch.equal(results["in_place"][0], results["copy"][0])
    torch.testing.assert_close(results["in_place"][1], results["copy"][1], atol=ATOL, rtol=0)


def test_the_in_place_views_are_the_models_own_tensors(tiny_llava):
    model = tiny_llava()
    inputs = INPUTS["padded-batch-2"]()
    with cm.sparsify(model, method(), neuron_weights="in_place") as session:
        cache = new_cache(model)
        generate(model, inputs, steps=2, cache=cache)
        ((_, per_layer),) = session.engine._sliced.values()
        for layer, ffn in per_layer.items():
            mlp = model.model.language_model.layers[layer].mlp
            size = ffn.swap.size
            assert ffn.up.data_ptr() == mlp.up_proj.weight.data_ptr() and ffn.up.shape[0] == size
            assert ffn.gate.data_ptr() == mlp.gate_proj.weight.data_ptr()
            assert ffn.down.data_ptr() == mlp.down_proj.weight.data_ptr() and ffn.down.shape[1] == size
            assert ffn.weight_bytes == 0
            masks = ffn.row_masks.numel() * ffn.row_masks.element_size()
            assert ffn.extra_bytes == masks + ffn.swap.nbytes
            assert session.engine.neuron_order._layers[layer].swap is ffn.swap  # still arranged after generate


# ---------------------------------------------------------------------------------------------- restoring


def test_the_model_is_restored_after_an_exception_mid_generation(tiny_llava):
    model = tiny_llava()
    before = snapshot(model)
    calls = {"count": 0, "reordered": None}

    def fail_on_the_third_decode_step(module, args, output):
        calls["count"] += 1
        if calls["count"] == 4:  # the prefill, then decode steps 1, 2, 3
            calls["reordered"] = sorted(session.engine.neuron_order._layers)
            raise RuntimeError("stop here")

    mlp = model.model.language_model.layers[2].mlp
    handle = mlp.register_forward_hook(fail_on_the_third_decode_step)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            with cm.sparsify(model, method(), neuron_weights="in_place") as session:
                generate(model, inputs_of(build_prompt(3, 5, seed=0), build_pixels(1, seed=0)), steps=6)
    finally:
        handle.remove()
    assert calls["reordered"] == NEURON_LAYERS  # the neurons were out of order when it raised
    assert_unchanged(model, before)


def test_the_model_is_restored_when_a_swap_fails_halfway(tiny_llava, monkeypatch):
    model = tiny_llava()
    before = snapshot(model)
    exchange, done = neuron_order._exchange, []

    def fail_on_the_second_tensor(parameter, dim, swap):
        done.append(parameter)
        if len(done) == 2:  # once: the first tensor of the first layer is swapped, the second fails
            raise RuntimeError("out of memory")
        exchange(parameter, dim, swap)

    monkeypatch.setattr(neuron_order, "_exchange", fail_on_the_second_tensor)
    with pytest.raises(RuntimeError, match="out of memory"):
        with cm.sparsify(model, method(), neuron_weights="in_place"):
            generate(model, inputs_of(build_prompt(3, 5, seed=0), build_pixels(1, seed=0)))
    assert len(done) == 3  # the failed swap, then the first tensor swapped back by remove()
    assert_unchanged(model, before)


@torch.no_grad()
def prefill(model, inputs):
    out = model(**inputs, use_cache=True)
    return out.logits[:, -1], out.cache


@torch.no_grad()
def step(model, logits, cache, mask):
    mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    out = model(input_ids=logits.argmax(-1).view(1, 1), attention_mask=mask, cache=cache, use_cache=True)
    return out.logits[:, -1], out.cache, mask


def interleaved(model, weights):
    """Two conversations decoded in alternation, a dense call and a second prefill in between: every logit."""
    first = inputs_of(build_prompt(2, 4, seed=11), build_pixels(1, seed=11))
    second = inputs_of(build_prompt(5, 3, seed=12), build_pixels(1, seed=12))
    text = inputs_of(torch.arange(3, 20))
    collected, records = [], []
    with cm.sparsify(model, method(), neuron_weights=weights) as session:
        logits_a, cache_a = prefill(model, first)
        records.append(session.last)
        logits_b, cache_b = prefill(model, second)
        mask_a, mask_b = first["attention_mask"], second["attention_mask"]
        for turn in range(3):
            logits_a, cache_a, mask_a = step(model, logits_a, cache_a, mask_a)
            logits_b, cache_b, mask_b = step(model, logits_b, cache_b, mask_b)
            collected += [logits_a, logits_b]
            if turn == 1:
                with torch.no_grad():
                    collected.append(model(**text).logits)  # no image: the model runs dense
                logits_again, _ = prefill(model, first)  # a fresh prefill of the first prompt
                records.append(session.last)
                collected.append(logits_again)
    return collected, records


def test_interleaved_conversations_and_a_dense_call_in_between(tiny_llava):
    model = tiny_llava()
    before = snapshot(model)
    with torch.no_grad():
        dense_text = model(**inputs_of(torch.arange(3, 20))).logits
    in_place, records = interleaved(model, "in_place")
    assert_unchanged(model, before)
    copied, copied_records = interleaved(model, "copy")
    for got, expected in zip(in_place, copied):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert torch.equal(in_place[4], dense_text)  # the dense call saw the original weights, bit for bit
    # the prefill after decoding chose from activations in the original neuron order
    for got, expected in zip(records, copied_records):
        assert torch.equal(got.keep_mask, expected.keep_mask)
        for layer in NEURON_LAYERS:
            assert torch.equal(got.core_neurons[layer], expected.core_neurons[layer])
    assert torch.equal(records[1].keep_mask, records[0].keep_mask)


def test_a_prefill_after_decoding_chooses_as_in_copy_mode(tiny_llava):
    model = tiny_llava()
    first = inputs_of(build_prompt(3, 5, seed=0), build_pixels(1, seed=0))
    second = inputs_of(build_prompt(4, 2, seed=7), build_pixels(1, seed=7))
    chosen = {}
    for weights in ("copy", "in_place"):
        with cm.sparsify(model, method(), neuron_weights=weights) as session:
            generate(model, first)
            tokens, logits = generate(model, second)
            chosen[weights] = (session.last, tokens, logits)
    (copy_record, copy_tokens, copy_logits), (record, tokens, logits) = chosen["copy"], chosen["in_place"]
    assert torch.equal(record.kept_positions[0], copy_record.kept_positions[0])
    for layer in NEURON_LAYERS:
        assert torch.equal(record.core_neurons[layer], copy_record.core_neurons[layer])
    assert torch.equal(tokens, copy_tokens)
    torch.testing.assert_close(logits, copy_logits, atol=ATOL, rtol=0)


def test_a_neuron_only_method_on_text_decodes_in_place(tiny_llava):
    """CoreInfer applies to text: no image, every layer's core neurons moved first."""
    model = tiny_llava()
    before = snapshot(model)
    inputs = inputs_of(torch.arange(3, 15))
    results = {}
    for weights in ("copy", "in_place"):
        with cm.sparsify(model, cm.CoreInfer(beta=0.3, neuron_layers=[1, 2, 3]), neuron_weights=weights) as session:
            results[weights] = generate(model, inputs)
            if weights == "in_place":
                assert sorted(session.engine.neuron_order._layers) == [1, 2, 3]
    assert_unchanged(model, before)
    assert torch.equal(results["in_place"][0], results["copy"][0])
    torch.testing.assert_close(results["in_place"][1], results["copy"][1], atol=ATOL, rtol=0)


def test_ffn_biases_move_with_their_neurons():
    model = build_tiny_llava(num_layers=4, seed=2, mlp_bias=True)
    before = snapshot(model)
    inputs = inputs_of(build_prompt(3, 5, seed=0), build_pixels(1, seed=0))
    results = {}
    for weights in ("copy", "in_place"):
        with cm.sparsify(model, method(), neuron_weights=weights):
            results[weights] = generate(model, inputs)
    assert_unchanged(model, before)
    assert torch.equal(results["in_place"][0], results["copy"][0])
    torch.testing.assert_close(results["in_place"][1], results["copy"][1], atol=ATOL, rtol=0)


def test_an_unknown_neuron_weights_value_is_refused(tiny_llava):
    model = tiny_llava()
    with pytest.raises(ValueError, match="neuron_weights must be one of 'copy', 'in_place', got 'view'"):
        cm.sparsify(model, method(), neuron_weights="view")
    with cm.sparsify(model, method()):  # nothing was left attached
        pass


# ------------------------------------------------------------------------------------------ memory and conversations


@pytest.fixture
def slices(monkeypatch):
    """Weak references to every sliced FFN the engine builds: .live() -> (count, bytes) of those still alive."""
    built = []
    gather, prefix = decoding_module.SlicedFFN.gather, decoding_module.prefix_ffn

    def record(ffn):
        if ffn is not None and not any(ref() is ffn for ref in built):
            built.append(weakref.ref(ffn))
        return ffn

    monkeypatch.setattr(decoding_module.SlicedFFN, "gather", staticmethod(lambda *args: record(gather(*args))))
    monkeypatch.setattr(decoding_module, "prefix_ffn", lambda *args: record(prefix(*args)))

    class Slices:
        @staticmethod
        def live() -> tuple[int, int]:
            gc.collect()
            alive = [ref() for ref in built if ref() is not None]
            return len(alive), sum(ffn.extra_bytes for ffn in alive)

        built_count = staticmethod(lambda: len(built))

    return Slices


def conversation(seed: int):
    return inputs_of(build_prompt(2 + seed % 3, 3 + seed % 4, seed=40 + seed), build_pixels(1, seed=40 + seed))


@pytest.mark.parametrize("weights", ["copy", "in_place"])
def test_finished_conversations_leave_no_sliced_weights(tiny_llava, slices, weights):
    """After each of six conversations (outputs and caches dropped) the sliced FFNs held are those after the first:
    none. In place, what stays is at most one swap per layer, to restore the order."""
    model = tiny_llava()
    held = []
    with cm.sparsify(model, method(), neuron_weights=weights) as session:
        for seed in range(6):
            generate(model, conversation(seed))
            held.append(slices.live())
        assert slices.built_count() >= 6 * len(NEURON_LAYERS)  # every conversation decoded with its own slices
        assert held == [(0, 0)] * 6
        swaps = {} if weights == "copy" else session.engine.neuron_order.swaps()
        assert len(swaps) <= len(NEURON_LAYERS)
        assert session.held_bytes == sum(swap.nbytes for swap in swaps.values())
    assert session.held_bytes == 0


@pytest.mark.parametrize("weights", ["copy", "in_place"])
def test_a_conversations_slices_live_as_long_as_its_cache_or_a_copy(tiny_llava, slices, weights):
    model = tiny_llava()
    first = conversation(1)
    with cm.sparsify(model, method(), neuron_weights=weights) as session:
        cache = new_cache(model)
        tokens, _ = generate(model, first, steps=2, cache=cache)
        count, size = slices.live()
        assert count == len(NEURON_LAYERS) and size > 0
        if weights == "copy":
            assert session.held_bytes == size
        copied = copy.deepcopy(cache)  # a prefix-cache entry, say
        del cache
        generate(model, conversation(2))  # another conversation runs and ends in between
        assert slices.live() == (count, size)
        built = slices.built_count()
        continued = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
        generate(model, continued, steps=2, cache=copied)  # the copy decodes on with the same slices
        assert slices.built_count() == built
        del copied
        assert slices.live() == (0, 0)


# ---------------------------------------------------------------------------------------------- tied weights


def tie_up_of_neuron_layers(layers):
    layers[2].mlp.up_proj.weight = layers[1].mlp.up_proj.weight
    return r"layers\.1\.mlp\.up_proj\.weight shares its memory with .*layers\.2\.mlp\.up_proj\.weight"


def tie_down_with_a_dense_layer(layers):
    layers[0].mlp.down_proj.weight = layers[3].mlp.down_proj.weight  # layer 0 is no neuron layer below
    return r"layers\.3\.mlp\.down_proj\.weight shares its memory with .*layers\.0\.mlp\.down_proj\.weight"


@pytest.mark.parametrize("tie", [tie_up_of_neuron_layers, tie_down_with_a_dense_layer])
def test_tied_ffn_weights_are_refused_in_place_and_decode_with_copies(tie):
    model = build_tiny_llava(num_layers=4, seed=3)
    expected_message = tie(model.model.language_model.layers)
    before = snapshot(model)
    tied_method = cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=8, beta=0.5, neuron_layers=[1, 2, 3])
    with pytest.raises(cm.UnsupportedModeError, match=r'neuron_weights="in_place" with tied FFN weights.*'):
        cm.sparsify(model, tied_method, neuron_weights="in_place")
    with pytest.raises(cm.UnsupportedModeError, match=expected_message):
        cm.sparsify(model, tied_method, neuron_weights="in_place")
    with cm.sparsify(model, tied_method):  # copies: nothing is moved; nothing was left attached by the refusal
        generate(model, inputs_of(build_prompt(3, 5, seed=0), build_pixels(1, seed=0)))
    assert_unchanged(model, before)


def test_one_ffn_module_shared_by_two_layers_is_refused():
    model = build_tiny_llava(num_layers=4, seed=3)
    layers = model.model.language_model.layers
    layers[2].mlp = layers[1].mlp
    before = snapshot(model)
    with pytest.raises(cm.UnsupportedModeError, match="in decoder layer 1, the FFN module shares its memory with "
                       "decoder layer 2"):
        cm.sparsify(model, method(), neuron_weights="in_place")
    with pytest.raises(cm.UnsupportedModelError, match="decoder layers 1 and 2 share one FFN module"):
        cm.sparsify(model, method())
    assert "forward" not in layers[1].mlp.__dict__  # nothing left attached
    assert_unchanged(model, before)


@pytest.mark.parametrize("weights", ["copy", "in_place"])
@pytest.mark.parametrize("which", list(INPUTS))
def test_the_bytes_a_cache_keeps_alive_are_known_from_its_prefill(tiny_llava, weights, which):
    """session.held_bytes_of(cache) right after the prefill (what a prefix cache stores) equals what the
    conversation's slices hold once its decode steps built them."""
    model = tiny_llava()
    with cm.sparsify(model, method(), neuron_weights=weights) as session:
        inputs = INPUTS[which]()
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            stored = copy.deepcopy(out.cache)
            before_decoding = session.held_bytes_of(stored)
            assert sliced_ffns(session) == []
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], dim=1)
            model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, cache=out.cache, use_cache=True)
        cache = out.cache
        built = sum(ffn.extra_bytes for ffn in sliced_ffns(session))
        assert before_decoding == built == session.held_bytes_of(cache) > 0
        assert session.held_bytes_of(new_cache(model)) == 0
