"""Generation modes found by running transformers' own generation tests under a session: packed sequences
(padding-free batching), core-neuron decoding when no row has a visual token, generate()'s compilation, and
assisted decoding on Idefics3. Each is exact against the dense model / the oracle, or refused by name."""

import logging

import pytest
import torch
from oracle import masked_reference, removed_mask
from tiny_llava import build_pixels, build_prompt

import corematching as cm
from corematching.runtime import generation_compile

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
PRUNE_LAYER = 1


# ---------------------------------------------------------------------------------------------- packed sequences


def prompt_of(seed: int) -> torch.Tensor:
    return build_prompt(2 + seed % 3, 3 + seed % 4, seed)


def packed_rows(orders: list[list[int]]) -> dict:
    """Rows each holding several prompts (an image each) one after the other, positions restarting at 0 for each
    prompt and no attention mask: padding-free batching. orders: per row, the seeds of its prompts."""
    rows, positions, pixels = [], [], []
    for seeds in orders:
        prompts = [prompt_of(seed) for seed in seeds]
        rows.append(torch.cat(prompts))
        positions.append(torch.cat([torch.arange(len(prompt)) for prompt in prompts]))
        pixels += [build_pixels(1, seed) for seed in seeds]
    assert len({len(row) for row in rows}) == 1, "rows of one batch must have the same length"
    return dict(input_ids=torch.stack(rows), position_ids=torch.stack(positions), pixel_values=torch.cat(pixels))


PACKED = [[0, 1, 2], [2, 0, 1]]  # two rows of the same three prompts in other orders


def forward(model, inputs: dict, **options) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **options).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_keeping_everything_equal_the_dense_model(tiny_llava, attn):
    """Without a cache transformers keeps each packed prompt's attention inside its block; a session that removes
    nothing must give the dense model's logits at every position (not only the first prompt's)."""
    model, inputs = tiny_llava(attn), packed_rows(PACKED)
    dense = forward(model, inputs, use_cache=False)
    keep_all = cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=1.0, neuron_layers=[])
    with cm.sparsify(model, keep_all) as session:
        logits = forward(model, inputs, use_cache=False)
        record = session.last
    assert record.prune_layer == PRUNE_LAYER  # tokens were chosen (all of them) and the upper layers re-masked
    torch.testing.assert_close(logits, dense, atol=ATOL, rtol=0)
    # each prompt of a row sees only itself: the last prompt's logits are those of that prompt alone
    last = prompt_of(PACKED[0][-1])
    alone = forward(model, dict(input_ids=last.unsqueeze(0), pixel_values=build_pixels(1, PACKED[0][-1])),
                    use_cache=False)
    torch.testing.assert_close(logits[0, -len(last) :], alone[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_with_tokens_removed_equal_the_oracle(tiny_llava, attn):
    """The oracle starts from the dense model's own (block-diagonal) masks and blocks the removed tokens."""
    model, inputs = tiny_llava(attn), packed_rows(PACKED)
    with cm.sparsify(model, cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=6, neuron_layers=[])) as session:
        logits = forward(model, inputs, use_cache=False)
        record = session.last
    length = inputs["input_ids"].shape[1]
    removed = removed_mask(record.keep_mask, record.visual_mask, length)
    assert removed.sum(1).tolist() == [3 * 30, 3 * 30]  # 6 of each image's 36 tokens kept
    with masked_reference(model.model.language_model, {}, removed, record.prune_layer, attn=attn):
        expected = forward(model, inputs, use_cache=False)
    for row, kept in enumerate(record.kept_positions):  # a pruned forward returns the kept tokens' logits
        torch.testing.assert_close(logits[row, -len(kept) :], expected[row, kept], atol=ATOL, rtol=0)


def test_packed_positions_with_a_cache_stay_one_sequence(tiny_llava):
    """With a cache (use_cache on, the default) transformers reads restarting positions as one causal sequence;
    so does the session."""
    model, inputs = tiny_llava(), packed_rows(PACKED)
    dense = forward(model, inputs)
    with cm.sparsify(model, cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=1.0, neuron_layers=[])):
        logits = forward(model, inputs)
    torch.testing.assert_close(logits, dense, atol=ATOL, rtol=0)


def test_packed_rows_with_a_method_reading_the_last_token_s_attention_are_refused(tiny_llava):
    model, inputs = tiny_llava(), packed_rows(PACKED)
    with cm.sparsify(model, cm.FastV(prune_layer=PRUNE_LAYER, token_budget=6)):
        with pytest.raises(cm.UnsupportedModeError, match="packed sequences.*FastV"):
            forward(model, inputs, use_cache=False)



def check_packed(model, inputs: dict, keep_all, prune, language_model) -> None:
    """keep_all: a method keeping every token, equal to the dense model; prune: one that removes tokens, equal to the
    oracle at the kept positions (the oracle starts from the model's own block-diagonal masks)."""
    dense = forward(model, inputs, use_cache=False)
    with cm.sparsify(model, keep_all) as session:
        logits = forward(model, inputs, use_cache=False)
        assert session.last.prune_layer is not None
    torch.testing.assert_close(logits, dense, atol=ATOL, rtol=0)
    with cm.sparsify(model, prune) as session:
        logits = forward(model, inputs, use_cache=False)
        record = session.last
    length = inputs["input_ids"].shape[1]
    removed = removed_mask(record.keep_mask, record.visual_mask, length)
    assert removed.any()
    with masked_reference(language_model, {}, removed, record.prune_layer):
        expected = forward(model, inputs, use_cache=False)
    for row, kept in enumerate(record.kept_positions):
        torch.testing.assert_close(logits[row, -len(kept) :], expected[row, kept], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2.5", "qwen3"])
def test_packed_rows_on_qwen_vl_equal_the_dense_model_and_the_oracle(kind):
    """Qwen-VL takes packed rows as position ids [4, B, T]: the text positions (restarting at each prompt, which
    the masks read) above each prompt's own M-RoPE positions."""
    from test_family_qwen_vl import IMAGE, inputs_of, model_of, prompt

    model = model_of(kind)
    prompts = [prompt([(4, 6)], 3, 5, seed=1), prompt([(6, 8)], 2, 4, seed=2), prompt([(4, 4)], 1, 3, seed=3)]
    positions = []
    for ids, pixels, grids, extras in prompts:
        one = inputs_of(ids, pixels, grids, extras)
        rope, _ = model.model.get_rope_index(one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"],
                                             image_grid_thw=grids, attention_mask=one["attention_mask"])
        positions.append(torch.cat([torch.arange(len(ids)).view(1, 1, -1), rope]))
    input_ids = torch.cat([ids for ids, *_ in prompts]).unsqueeze(0)
    inputs = dict(input_ids=input_ids, position_ids=torch.cat(positions, dim=-1),
                  pixel_values=torch.cat([pixels for _, pixels, *_ in prompts]),
                  image_grid_thw=torch.cat([grids for _, _, grids, _ in prompts]),
                  mm_token_type_ids=(input_ids == IMAGE).int())
    keep_all = cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=1.0, neuron_layers=[])
    prune = cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=2, neuron_layers=[])
    check_packed(model, inputs, keep_all, prune, model.model.language_model)


def gemma3_packed(token_types: bool) -> tuple:
    from test_family_gemma3 import IMAGE, model_of, sample

    prompts = [sample(1, 3, 5, seed=1), sample(2, 2, 3, seed=2)]
    input_ids = torch.cat([ids for ids, _ in prompts]).unsqueeze(0)
    positions = torch.cat([torch.arange(len(ids)) for ids, _ in prompts]).unsqueeze(0)
    inputs = dict(input_ids=input_ids, position_ids=positions, pixel_values=torch.cat([px for _, px in prompts]))
    if token_types:
        inputs["token_type_ids"] = (input_ids == IMAGE).long()
    return model_of(), inputs


def test_packed_rows_with_sliding_windows_equal_the_dense_model_and_the_oracle():
    """Gemma 3 without token_type_ids (causal images): sliding-window and global layers after the prune layer."""
    from test_family_gemma3 import PRUNE_LAYER as GEMMA_PRUNE_LAYER

    model, inputs = gemma3_packed(token_types=False)
    keep_all = cm.CoreMatching(prune_layer=GEMMA_PRUNE_LAYER, token_budget=1.0, neuron_layers=[])
    prune = cm.CoreMatching(prune_layer=GEMMA_PRUNE_LAYER, token_budget=4, neuron_layers=[])
    check_packed(model, inputs, keep_all, prune, model.model.language_model)


def test_packed_rows_with_bidirectional_images_are_refused():
    from test_family_gemma3 import PRUNE_LAYER as GEMMA_PRUNE_LAYER

    model, inputs = gemma3_packed(token_types=True)
    with cm.sparsify(model, cm.CoreMatching(prune_layer=GEMMA_PRUNE_LAYER, token_budget=4, neuron_layers=[])):
        with pytest.raises(cm.UnsupportedModeError, match=r"packed sequences .* with images attended both ways"):
            forward(model, inputs, use_cache=False)

# ---------------------------------------------------------------------------------------------- no row decodes sparse


def test_core_neurons_when_every_image_token_is_padding_decode_dense():
    """LLaVA-NeXT, explicit position_ids, a left-padded batch whose image tokens are all masked out: no row has a
    visual token, so every row decodes dense (it used to reach the FFN gather with an empty core-neuron set)."""
    from test_family_llava_next import IMAGE, SUPPRESS, batch, model_of, sample

    model = model_of("next")
    inputs = batch("next", [sample("next", [(12, 24)], 3, 4, seed=1), sample("next", [(24, 12)], 5, 2, seed=2)])
    attention_mask = inputs["attention_mask"].masked_fill(inputs["input_ids"] == IMAGE, 0)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    inputs.update(attention_mask=attention_mask, position_ids=position_ids)
    options = dict(max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS, output_logits=True,
                   return_dict_in_generate=True)
    dense = model.generate(**inputs, **options)
    method = cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=4, beta=0.5, neuron_layers=[0, 2, 3])
    with cm.sparsify(model, method) as session:
        out = model.generate(**inputs, **options)
        record = session.last
    assert not record.visual_mask.any()
    assert torch.equal(out.sequences, dense.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(dense.logits, 1), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- generate() compile


def test_switching_generate_s_compilation_off_is_logged_once(tiny_llava, caplog, monkeypatch):
    from transformers import CompileConfig

    model = tiny_llava()
    monkeypatch.setattr(generation_compile, "_noted", set())
    method = cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=8, neuron_layers=[])
    caplog.set_level(logging.WARNING, logger="corematching")
    with cm.sparsify(model, method):  # nothing would compile: nothing to say
        pass
    assert not caplog.records
    monkeypatch.setattr(model.generation_config, "compile_config", CompileConfig())
    for _ in range(2):
        with cm.sparsify(model, method):
            assert model.generation_config.disable_compile is True
    assert not model.generation_config.disable_compile
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and "disable_compile" in messages[0] and "compile_config" in messages[0]


def test_a_static_cache_implementation_is_named_in_the_log(tiny_llava, caplog, monkeypatch):
    model = tiny_llava()
    monkeypatch.setattr(generation_compile, "_noted", set())
    monkeypatch.setattr(model.generation_config, "cache_implementation", "static")
    caplog.set_level(logging.WARNING, logger="corematching")
    with cm.sparsify(model, cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=8, neuron_layers=[])):
        pass
    assert ["cache_implementation='static'" in record.getMessage() for record in caplog.records] == [True]



# ---------------------------------------------------------------------------------------------- assisted decoding


ASSISTED_METHODS = {
    "tokens": cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=3, beta=0.5, neuron_layers=[]),
    "tokens and neurons": cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=3, beta=0.5, neuron_layers=[1, 2, 3]),
    "last match": cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=3, match="last", neuron_layers=[0, 2]),
    "fastv": cm.FastV(prune_layer=PRUNE_LAYER, token_budget=3),
    "two stages": cm.PDrop(schedule=((1, 0.5), (2, 0.5))),
    "neurons only": cm.CoreInfer(beta=0.5, neuron_layers=[0, 2]),  # also applies to prompts without images
}


@pytest.mark.parametrize("name", list(ASSISTED_METHODS))
def test_assisted_decoding_equals_greedy_search_on_idefics3(name):
    """Assisted decoding's first call is the prompt followed by the first candidates (the assistant's or prompt
    lookup's); the decisions must be the prompt's, as in greedy search, and the candidates decoded as greedy
    search decodes them. A random assistant (candidates rejected), the model itself (accepted), prompt lookup."""
    from test_family_idefics3 import batch, build, model_of, sample

    model, random_assistant = model_of("idefics3"), build("idefics3", seed=5)
    for assistant in (model, random_assistant):
        assistant.generation_config.num_assistant_tokens = 2
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
    inputs = batch([sample([None], text_before=3, text_after=4, seed=0)])
    options = dict(max_new_tokens=4, do_sample=False, eos_token_id=-1, output_logits=True,
                   return_dict_in_generate=True)
    with cm.sparsify(model, ASSISTED_METHODS[name]) as session:
        greedy = model.generate(**inputs, **options)
        record = session.last
        assert len(record.kept_positions[0]) < inputs["input_ids"].shape[1] or record.neurons  # it did something
        for assisted in (dict(assistant_model=random_assistant), dict(assistant_model=model),
                         dict(prompt_lookup_num_tokens=2)):
            out = model.generate(**inputs, **options, **assisted)
            assert torch.equal(out.sequences, greedy.sequences)
            torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(greedy.logits, 1), atol=1e-4, rtol=0)
