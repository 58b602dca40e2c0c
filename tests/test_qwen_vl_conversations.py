"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: positions belong to the conversation. transformers keeps `rope_deltas` on the
model; under a session a conversation continued from (a copy of) its cache after other conversations ran gets
its own back, and equals the oracle (tests/oracle.py) of the same calls with nothing in between."""

import copy

import pytest
import torch
from oracle import masked_reference, removed_mask
from test_family_qwen_vl import END, IMAGE, START, VIDEO, inputs_of, model_of, prompt

import corematching as cm

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["qwen2", "qwen2.5", "qwen3"]
ATOL = 1e-5
STEPS = 3
SUPPRESS = [IMAGE, VIDEO, START, END]
QUESTION = torch.tensor([[11, 12, 13]])

CONVERSATION_A = prompt([(4, 6), (6, 8)], 3, 5, seed=1)  # 6 + 12 visual tokens, M-RoPE delta -11
CONVERSATION_B = prompt([(8, 8)], 2, 2, seed=2)  # another grid: 16 visual tokens, delta -12
BATCH_MATE = prompt([(4, 4), (4, 8)], 4, 1, seed=3)
SAME_LENGTH = prompt([(4, 4), (4, 8)], 7, 7, seed=5)  # as long as A (31 tokens), delta -6
NEW_IMAGE = prompt([(6, 6)], 0, 4, seed=4)  # a second turn: its image (9 visual tokens) and text, no BOS


def method(neurons: bool = True) -> cm.CoreMatching:
    return cm.CoreMatching(prune_layer=1, token_budget=0.5, beta=0.5, neuron_layers=[2, 3] if neurons else [])


def prefill(model, inputs: dict):
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    return out.logits[:, -1], out.cache


def continue_greedy(model, input_ids: torch.Tensor, cache, steps: int = STEPS, **extra) -> torch.Tensor:
    """Feed input_ids (and `extra`: a new turn's images) on the cache, then greedy steps: logits [B, 1 + steps, V].
    No attention mask: transformers places the new tokens after the cache from the model's rope_deltas."""
    logits = []
    with torch.no_grad():
        out = model(input_ids=input_ids, cache=cache, use_cache=True, **extra)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
    logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


def generate(model, inputs: dict, **options):
    options = {"max_new_tokens": STEPS, "do_sample": False, **options}
    out = model.generate(**inputs, output_logits=True, return_dict_in_generate=True, suppress_tokens=SUPPRESS,
                         **options)
    return out.sequences, torch.stack(out.logits, dim=1)


def with_question(inputs: dict) -> dict:
    """The whole conversation so far plus the question, as generate() takes it to continue the cache."""
    input_ids = torch.cat([inputs["input_ids"], QUESTION], dim=1)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == IMAGE).int())


def oracle(model, turns: list, length: int, decode_from: int, rows: torch.Tensor | None = None):
    """The oracle of a conversation whose turns' records are `turns`: [(record, first sequence index)]; core neurons
    from the first (the prefill's), zeroed from decode_from on. rows: the prefill's row each cache row follows."""
    first = turns[0][0]
    removed = torch.zeros(first.keep_mask.shape[0], length, dtype=torch.bool)
    for record, offset in turns:
        removed[:, offset:] |= removed_mask(record.keep_mask, record.visual_mask, length - offset)
    core_neurons = first.core_neurons_per_sample
    if rows is not None:
        removed, core_neurons = removed[rows], [core_neurons[row] for row in rows.tolist()]
    language_model = model.model.language_model
    ffns = {layer: language_model.layers[layer].mlp for layer in first.neurons}
    return masked_reference(language_model, ffns, removed, first.prune_layer, core_neurons, decode_from)


def assert_pruned(record) -> None:
    kept = int((record.keep_mask & record.visual_mask).sum())
    assert 0 < kept < int(record.visual_mask.sum())


def run_other_conversation(model, batch: bool = False) -> None:
    """Another conversation (another grid; or a batch of two) prefilled and decoded in between."""
    if not batch:
        generate(model, inputs_of(*CONVERSATION_B))
        return
    first, second = CONVERSATION_B, BATCH_MATE
    width = max(len(first[0]), len(second[0]))
    rows = [torch.cat([torch.zeros(width - len(ids), dtype=torch.long), ids]) for ids, *_ in (first, second)]
    input_ids = torch.stack(rows)
    inputs = dict(
        input_ids=input_ids,
        attention_mask=torch.stack([(torch.arange(width) >= width - len(p[0])).long() for p in (first, second)]),
        mm_token_type_ids=(input_ids == IMAGE).int(),
        pixel_values=torch.cat([first[1], second[1]]),
        image_grid_thw=torch.cat([first[2], second[2]]),
    )
    generate(model, inputs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("between", ["conversation", "batch"])
def test_a_copy_continues_after_another_conversation(kind, between):
    """Prefix caching: A prefilled, copied; B (another grid, or a batch of two) runs; A's copy continues by hand
    and through generate(), like A with nothing in between."""
    model = model_of(kind)
    inputs = inputs_of(*CONVERSATION_A)
    length = inputs["input_ids"].shape[1]
    with cm.sparsify(model, method()) as session:
        _, cache = prefill(model, inputs)
        record = session.last
        by_hand, by_generate = copy.deepcopy(cache), copy.deepcopy(cache)
        run_other_conversation(model, batch=between == "batch")
        logits = continue_greedy(model, QUESTION, by_hand)
        run_other_conversation(model, batch=between == "batch")
        tokens, generated = generate(model, with_question(inputs), cache=by_generate)
    assert_pruned(record)
    total = length + QUESTION.shape[1] + STEPS
    with oracle(model, [(record, 0)], total, length):
        _, cache = prefill(model, inputs)
        expected = continue_greedy(model, QUESTION, copy.deepcopy(cache))
        expected_tokens, expected_generated = generate(model, with_question(inputs), cache=cache)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(generated, expected_generated, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_turn_with_a_new_image_after_another_conversation(kind):
    """A's first turn prefilled and copied; B runs; A's copy gets a second turn with a new image (its tokens chosen
    too), then decodes: the oracle of A's two turns with nothing in between."""
    model = model_of(kind)
    inputs = inputs_of(*CONVERSATION_A)
    length = inputs["input_ids"].shape[1]
    turn_two, pixels, grid, _ = NEW_IMAGE
    turn_two = turn_two[1:].unsqueeze(0)
    new_image = dict(pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(turn_two == IMAGE).int())
    with cm.sparsify(model, method(neurons=False)) as session:
        _, cache = prefill(model, inputs)
        first = session.last
        copied = copy.deepcopy(cache)
        run_other_conversation(model)
        logits = continue_greedy(model, turn_two, copied, **new_image)
        second = session.last
    assert_pruned(first)
    assert_pruned(second)  # the new image's tokens were chosen too
    total = length + turn_two.shape[1] + STEPS
    with oracle(model, [(first, 0), (second, length)], total, total):
        _, cache = prefill(model, inputs)
        expected = continue_greedy(model, turn_two, cache, **new_image)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_interleaved_conversations_each_decode_at_their_positions(kind):
    """A and B (other grids) prefilled, then decoded one step each in turn by hand."""
    model = model_of(kind)
    conversations = [inputs_of(*CONVERSATION_A), inputs_of(*CONVERSATION_B)]
    with cm.sparsify(model, method()) as session:
        caches, records, logits = [], [], []
        for inputs in conversations:
            last, cache = prefill(model, inputs)
            caches.append(cache)
            records.append(session.last)
            logits.append([last])
        with torch.no_grad():
            for _ in range(STEPS):
                for index, cache in enumerate(caches):
                    out = model(input_ids=logits[index][-1].argmax(-1, keepdim=True), cache=cache, use_cache=True)
                    logits[index].append(out.logits[:, -1])
    for inputs, record, got in zip(conversations, records, logits):
        assert_pruned(record)
        length = inputs["input_ids"].shape[1]
        with oracle(model, [(record, 0)], length + STEPS, length), torch.no_grad():
            last, cache = prefill(model, inputs)
            expected = [last]
            for _ in range(STEPS):
                out = model(input_ids=expected[-1].argmax(-1, keepdim=True), cache=cache, use_cache=True)
                expected.append(out.logits[:, -1])
        torch.testing.assert_close(torch.stack(got, dim=1), torch.stack(expected, dim=1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_expanded_and_reordered_with_the_cache_keep_their_positions(kind):
    """A batch of two conversations (different deltas, no padding) prefilled; its cache's rows repeated and
    reordered as beam search does; B runs; each row continues at its own conversation's positions."""
    model = model_of(kind)
    ids = torch.stack([CONVERSATION_A[0], SAME_LENGTH[0]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMAGE).int(),
                  pixel_values=torch.cat([CONVERSATION_A[1], SAME_LENGTH[1]]),
                  image_grid_thw=torch.cat([CONVERSATION_A[2], SAME_LENGTH[2]]))
    rows = torch.tensor([2, 0, 3, 1])  # of the repeated rows [A, A, mate, mate]: [mate, A, mate, A]
    question = QUESTION.expand(len(rows), -1)

    def rearrange(cache):
        cache.batch_repeat_interleave(2)
        cache.reorder_cache(rows)
        return cache

    with cm.sparsify(model, method()) as session:
        _, cache = prefill(model, inputs)
        record = session.last
        cache = rearrange(copy.deepcopy(cache))
        run_other_conversation(model)
        logits = continue_greedy(model, question, cache)
    assert_pruned(record)
    length = ids.shape[1]
    samples = rows // 2  # the prompt of each rearranged row: the oracle prefills them so, rows being independent
    rearranged = {name: value[samples] for name, value in inputs.items() if name.endswith("_ids") or "mask" in name}
    prompts = [(CONVERSATION_A, SAME_LENGTH)[sample] for sample in samples.tolist()]
    rearranged["pixel_values"] = torch.cat([pixels for _, pixels, _, _ in prompts])
    rearranged["image_grid_thw"] = torch.cat([grids for _, _, grids, _ in prompts])
    with oracle(model, [(record, 0)], length + QUESTION.shape[1] + STEPS, length, samples):
        _, cache = prefill(model, rearranged)
        expected = continue_greedy(model, question, cache)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_removed_still_continues_at_the_conversations_positions(kind):
    """Under a session that removes nothing (cm.Dense()), a copy continued after B equals the dense model's
    continuation with nothing in between; the cache stays usable after the session."""
    model = model_of(kind)
    inputs = inputs_of(*CONVERSATION_A)
    with cm.sparsify(model, cm.Dense()):
        _, cache = prefill(model, inputs)
        copied = copy.deepcopy(cache)
        run_other_conversation(model)
        logits = continue_greedy(model, QUESTION, copied)
    _, cache = prefill(model, inputs)
    expected = continue_greedy(model, QUESTION, cache)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    continue_greedy(model, QUESTION, copied, steps=1)  # outside the session: no refusal, nothing was removed
