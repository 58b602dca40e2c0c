"""The session: restoring the model exactly, and rejecting bad settings and unsupported models."""

import pytest
import torch
from tiny_llava import IMAGE_TOKEN
from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration, Phi3Config

import corematching as cm

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def snapshot(model):
    return {
        "state": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "parameters": {name: (id(p), p.data_ptr()) for name, p in model.named_parameters()},
        "modules": [(name, id(module), type(module)) for name, module in model.named_modules()],
        "instance_attributes": {name: set(vars(module)) for name, module in model.named_modules()},
        # transformers installs its own output-capturing hooks on a model's first forward: compare with those
        "hooks": {
            name: {kind: dict(getattr(module, kind)) for kind in HOOK_DICTS} for name, module in model.named_modules()
        },
    }


def warm_snapshot(model, inputs):
    """Snapshot after a dense forward and generation, so that transformers' lazily added hooks are in it."""
    model(**inputs)
    model.generate(**inputs, max_new_tokens=1, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    return snapshot(model)


def assert_restored(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["parameters"] == before["parameters"]
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name
    assert after["instance_attributes"] == before["instance_attributes"]
    assert after["hooks"] == before["hooks"]
    for name, module in model.named_modules():
        assert "forward" not in vars(module), name


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


METHODS = [
    cm.CoreMatching(prune_layer=1, token_budget=6, beta=0.5, neuron_layers=[0, 1, 2, 3]),
    cm.RandomTokens(token_budget=4, prune_layer=0),
    cm.UniformTokens(token_budget=9, prune_layer=2),
    cm.Dense(),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_model_is_restored_after_the_block(tiny_llava, single_inputs, method):
    model, inputs = tiny_llava(), single_inputs()
    before, dense_logits = warm_snapshot(model, inputs), logits_of(model, inputs)
    with cm.sparsify(model, method):
        model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    assert_restored(model, before)
    assert torch.equal(logits_of(model, inputs), dense_logits)


def test_model_is_restored_after_an_exception_in_the_block(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    before, dense_logits = warm_snapshot(model, inputs), logits_of(model, inputs)
    with pytest.raises(KeyError, match="raised inside"):
        with cm.sparsify(model, METHODS[0]):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
            raise KeyError("raised inside")
    assert_restored(model, before)
    assert torch.equal(logits_of(model, inputs), dense_logits)


def test_model_is_restored_after_an_exception_inside_the_forward(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    before = warm_snapshot(model, inputs)
    broken = dict(inputs, input_ids=inputs["input_ids"][:, :-12])  # fewer image tokens than features
    broken.pop("attention_mask")
    with pytest.raises(ValueError):
        with cm.sparsify(model, METHODS[0]) as session:
            model(**inputs)  # a good call first, so that a prompt state exists
            model(**broken)
    assert session.last is not None
    assert_restored(model, before)


def test_session_without_with_and_repeated_remove(tiny_llava, single_inputs):
    model, inputs = tiny_llava(), single_inputs()
    before, dense_logits = warm_snapshot(model, inputs), logits_of(model, inputs)
    session = cm.sparsify(model, METHODS[0])
    assert session.last is None
    sparse_logits = logits_of(model, inputs)
    assert sparse_logits.shape[1] < dense_logits.shape[1]
    assert session.last.kept_positions[0].shape[0] == sparse_logits.shape[1]
    session.remove()
    session.remove()
    assert_restored(model, before)
    again = cm.sparsify(model, METHODS[0])  # a removed session frees the model for the next one
    again.remove()
    assert_restored(model, before)


def test_two_sessions_on_one_model_are_refused(tiny_llava, single_inputs):
    model = tiny_llava()
    before = warm_snapshot(model, single_inputs())
    with cm.sparsify(model, METHODS[0]):
        with pytest.raises(RuntimeError, match="already"):
            cm.sparsify(model, METHODS[1])
    assert_restored(model, before)


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("rho", dict(rho=0.0)),
        ("rho", dict(rho=1.5)),
        ("rho", dict(rho=-0.2)),
        ("rho", dict(rho="0.2")),
        ("beta", dict(beta=0)),
        ("beta", dict(beta=1.01)),
        ("token_budget", dict(token_budget=0)),
        ("token_budget", dict(token_budget=-4)),
        ("token_budget", dict(token_budget=0.0)),
        ("token_budget", dict(token_budget=1.5)),
        ("token_budget", dict(token_budget="64")),
        ("token_budget", dict(token_budget=True)),
        ("match", dict(match="image")),
        ("prune_layer", dict(prune_layer=-1)),
        ("prune_layer", dict(prune_layer=1.0)),
        ("neuron_layers", dict(neuron_layers=[2, 2])),
        ("neuron_layers", dict(neuron_layers=[-1])),
        ("neuron_layers", dict(neuron_layers="3")),
        ("min_tokens", dict(min_tokens=0)),
    ],
)
def test_bad_core_matching_settings_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        cm.CoreMatching(**kwargs)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: cm.RandomTokens(token_budget=None), "token_budget"),
        (lambda: cm.RandomTokens(token_budget=0), "token_budget"),
        (lambda: cm.RandomTokens(seed=1.5), "seed"),
        (lambda: cm.UniformTokens(token_budget=-1), "token_budget"),
        (lambda: cm.UniformTokens(prune_layer=-2), "prune_layer"),
    ],
)
def test_bad_baseline_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_good_settings_are_accepted():
    cm.CoreMatching(token_budget=None, rho=1.0, beta=1.0, neuron_layers=[0, 3], match="last", min_tokens=4)
    cm.CoreMatching(token_budget=1, prune_layer=0)
    cm.CoreMatching(token_budget=1.0)


@pytest.mark.parametrize("prune_layer", [3, 4, 30])
def test_prune_layer_out_of_range_is_caught_at_sparsify(tiny_llava, single_inputs, prune_layer):
    model = tiny_llava()
    before = warm_snapshot(model, single_inputs())
    with pytest.raises(ValueError, match=r"prune_layer.*4 layers"):
        cm.sparsify(model, cm.CoreMatching(prune_layer=prune_layer))
    assert_restored(model, before)


def test_neuron_layers_out_of_range_are_caught_at_sparsify(tiny_llava):
    with pytest.raises(ValueError, match=r"neuron_layers.*4 layers"):
        cm.sparsify(tiny_llava(), cm.CoreMatching(prune_layer=1, neuron_layers=[2, 4]))


def test_something_else_than_a_method_is_refused(tiny_llava):
    with pytest.raises(TypeError, match="method"):
        cm.sparsify(tiny_llava(), {"prune_layer": 2})


# ---------------------------------------------------------------------------------------------- models


def test_a_text_only_model_is_unsupported():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(cm.UnsupportedModelError, match="LlamaForCausalLM"):
        cm.sparsify(LlamaForCausalLM(config), cm.CoreMatching(prune_layer=0))


def test_llava_with_another_language_model_is_unsupported(tiny_llava):
    vision = tiny_llava().config.vision_config
    text = Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=120))
    with pytest.raises(cm.UnsupportedModelError, match="Phi3Model"):
        cm.sparsify(model, cm.CoreMatching(prune_layer=0))


def test_an_unsupported_attention_implementation_is_named(tiny_llava):
    model = tiny_llava()
    language_config = model.model.language_model.config
    original = language_config._attn_implementation
    language_config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(cm.UnsupportedModelError, match="flex_attention"):
            cm.sparsify(model, cm.CoreMatching(prune_layer=0))
    finally:
        language_config._attn_implementation = original
    assert language_config._attn_implementation == original


def test_generation_compile_is_switched_off_for_the_session_only(tiny_llava):
    model = tiny_llava()
    before = model.generation_config.disable_compile
    with cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=4)):
        assert model.generation_config.disable_compile is True
    assert model.generation_config.disable_compile == before
