"""Plain causal language models (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text) and the language model inside a VLM:
core-neuron decoding alone (CoreInfer) against the dense model and the oracle; token methods refused."""

import pytest
import torch
from family_checks import (
    check_against_oracle,
    check_batch_equals_alone,
    check_keep_all_equals_dense,
    check_restored,
    generate,
)
from tiny_llava import build_tiny_llava

import corematching as cm

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 0
NEURON_LAYERS = [0, 2, 3]
KINDS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def build(kind: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=1,
                  eos_token_id=2, initializer_range=0.1)
    if kind == "llama":
        config, model_class = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif kind == "mistral":  # every layer slides, over fewer tokens than the prompts
        config, model_class = transformers.MistralConfig(sliding_window=8, **common), transformers.MistralForCausalLM
    elif kind == "qwen2":
        config, model_class = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif kind == "qwen3":
        config, model_class = transformers.Qwen3Config(head_dim=16, **common), transformers.Qwen3ForCausalLM
    else:
        layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
        config = transformers.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                               layer_types=layer_types, **common)
        model_class = transformers.Gemma3ForCausalLM
    model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


_MODELS = {}


def model_of(kind: str = "llama"):
    if kind not in _MODELS:
        _MODELS[kind] = build(kind)
    return _MODELS[kind]


def prompt(length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([1]), torch.randint(3, 120, (length - 1,), generator=generator)])


def batch(prompts: list[torch.Tensor]) -> dict:
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), PAD)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = ids
        attention_mask[row, width - len(ids) :] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask)


PROMPT = prompt(20, seed=1)


def core_infer(beta: float = 0.5) -> cm.CoreInfer:
    return cm.CoreInfer(beta=beta, neuron_layers=NEURON_LAYERS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_neuron_kept_equals_dense(kind):
    check_keep_all_equals_dense(model_of(kind), batch([PROMPT]), [], core_infer(beta=1.0))


@pytest.mark.parametrize("kind", KINDS)
def test_core_neuron_decoding_equals_the_oracle(kind):
    model = model_of(kind)
    record = check_against_oracle(model, model.model, batch([PROMPT]), [], core_infer(), steps=6)
    assert sorted(record.core_neurons) == NEURON_LAYERS
    assert all(len(neurons) == 48 for neurons in record.core_neurons.values())  # beta 0.5 of 96


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_a_static_cache_with_one_mask_per_layer_type_equals_the_oracle(kind):
    """generate() builds one mask per layer type for a static cache: the session reads the padding from it."""
    model = model_of(kind)
    inputs = batch([prompt(9, seed=2), prompt(17, seed=3)])
    record = check_against_oracle(model, model.model, inputs, [], core_infer(), cache_implementation="static")
    assert sorted(record.core_neurons) == NEURON_LAYERS


def test_a_batch_of_different_lengths_equals_each_prompt_alone():
    first, second = prompt(9, seed=2), prompt(17, seed=3)
    alone = [batch([first]), batch([second])]
    check_batch_equals_alone(model_of("qwen2"), batch([first, second]), alone, [], core_infer())


def test_the_model_is_restored_after_the_block_and_after_an_exception():
    check_restored(model_of("gemma3"), batch([PROMPT]), [], core_infer())


def test_the_language_model_of_a_vlm_decodes_text_with_core_neurons():
    """sparsify on a VLM's language model alone: text prompts through the whole VLM equal the oracle."""
    model = build_tiny_llava(seed=3)
    language_model = model.model.language_model
    inputs = batch([PROMPT])
    with cm.sparsify(language_model, core_infer()) as session:
        tokens, logits = generate(model, inputs, [])
        record = session.last
    assert sorted(record.core_neurons) == NEURON_LAYERS
    reference = check_against_oracle(model, language_model, inputs, [], core_infer())
    assert all(torch.equal(record.core_neurons[k], reference.core_neurons[k]) for k in NEURON_LAYERS)


def test_a_token_method_on_a_text_model_is_refused():
    for method in (cm.CoreMatching(prune_layer=1), cm.RandomTokens(token_budget=4, prune_layer=1)):
        with pytest.raises(cm.UnsupportedModelError, match="Qwen3ForCausalLM is a text-only model.*CoreInfer"):
            cm.sparsify(model_of("qwen3"), method)


def test_a_model_that_is_not_a_gated_decoder_is_unsupported():
    import transformers

    config = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2)
    with pytest.raises(cm.UnsupportedModelError, match="GPT2LMHeadModel"):
        cm.sparsify(transformers.GPT2LMHeadModel(config), core_infer())
