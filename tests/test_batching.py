"""Continuous batching (runtime/batching.py): conversations prefilled at different times join one decode batch and
leave it when they finish. A request's greedy tokens and logits equal those of the oracle (tests/oracle.py) and
of the request decoded alone, whatever joined or left around it, under seeded random arrival orders."""

import random

import pytest
import torch
from oracle import masked_reference, removed_mask
from tiny_llava import build_pixels, build_prompt, left_pad

import corematching as cm
from corematching.runtime import DecodeBatch, kv_bytes, merge_batches, prefill_batch

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5


# ------------------------------------------------------------------------------------------------ requests


def llava_request(index: int, with_image: bool = True) -> dict:
    """One prompt (1-D ids) and its pixels; text lengths differ from request to request."""
    ids = build_prompt(1 + index % 4, 2 + (3 * index) % 7, seed=index)
    if not with_image:
        return {"ids": ids[ids != 120][:6 + index], "pixels": None}
    return {"ids": ids, "pixels": build_pixels(1, index)}


def llava_inputs(requests: list[dict]) -> dict:
    """The requests as one left-padded batch (the processor's output)."""
    input_ids, attention_mask = left_pad([r["ids"] for r in requests])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    pixels = [r["pixels"] for r in requests if r["pixels"] is not None]
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels)
    return inputs


def qwen_request(index: int) -> dict:
    from test_family_qwen_vl import prompt

    grids = [[(4, 4)], [(4, 6), (6, 8)], [(8, 8)], [(4, 8)], [(6, 6), (4, 4)]][index % 5]
    ids, pixels, grids, _ = prompt(grids, 1 + index % 3, 2 + index % 4, seed=10 + index)
    return {"ids": ids, "pixels": pixels, "grids": grids}


def qwen_inputs(requests: list[dict]) -> dict:
    from test_family_qwen_vl import IMAGE, PAD

    width = max(len(r["ids"]) for r in requests)
    input_ids = torch.stack([torch.cat([torch.full((width - len(r["ids"]),), PAD), r["ids"]]) for r in requests])
    attention_mask = torch.stack([(torch.arange(width) >= width - len(r["ids"])).long() for r in requests])
    return dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=(input_ids == IMAGE).int(),
                pixel_values=torch.cat([r["pixels"] for r in requests]),
                image_grid_thw=torch.cat([r["grids"] for r in requests]))


def family(name: str):
    """(model, request maker, batch inputs maker, generate options)."""
    if name == "llava":
        from tiny_llava import build_tiny_llava

        return build_tiny_llava(), llava_request, llava_inputs, {}
    from test_family_qwen_vl import END, IMAGE, START, VIDEO, model_of

    return model_of("qwen2"), qwen_request, qwen_inputs, {"suppress_tokens": [IMAGE, VIDEO, START, END]}


METHODS = {
    "corematching": lambda: cm.CoreMatching(prune_layer=1, token_budget=None, beta=0.5, neuron_layers=[2, 3]),
    "tokens-only": lambda: cm.FastV(prune_layer=1, token_budget=0.4),
    "two-stages": lambda: cm.PDrop(schedule=((0, 0.6), (2, 0.5))),
    "neurons-only": lambda: cm.CoreInfer(beta=0.5, neuron_layers=[1, 3]),
    "dense": None,
}


# ------------------------------------------------------------------------------------------------ runs


def suppress(logits: torch.Tensor, options: dict) -> torch.Tensor:
    """Greedy choice as generate makes it with the family's suppressed tokens."""
    tokens = options.get("suppress_tokens")
    if not tokens:
        return logits.argmax(-1)
    logits = logits.clone()
    logits[:, tokens] = float("-inf")
    return logits.argmax(-1)


def alone(model, inputs: dict, steps: int, options: dict) -> torch.Tensor:
    """One request prefilled and decoded by itself: logits [steps, V]."""
    batch, logits = prefill_batch(model, inputs, **options)
    out = [logits[0]]
    for _ in range(steps - 1):
        out.append(batch.step(model, suppress(out[-1][None], options))[0])
    return torch.stack(out)


def oracle(model, inputs: dict, record, steps: int, options: dict) -> torch.Tensor:
    """The oracle's logits [steps, V] of one request (greedy, through generate)."""
    prompt = inputs["input_ids"].shape[1]
    language_model = model.model.language_model
    if record is None or (record.prune_layer is None and not record.neurons):
        removed, prune_layer, neurons, ffns = None, None, None, {}
    else:
        removed = removed_mask(record.keep_mask, record.visual_mask, prompt + steps)
        removed = {layer: removed_mask(keep, record.visual_mask, prompt + steps)
                   for layer, keep in record.stage_keep_masks.items()} or removed
        prune_layer = record.prune_layer
        neurons = record.core_neurons_per_sample
        ffns = {layer: language_model.layers[layer].mlp for layer in record.neurons}
    blocked = removed if removed is not None else torch.zeros(1, prompt + steps, dtype=torch.bool)
    with masked_reference(language_model, ffns, blocked, prune_layer, neurons, decode_from=prompt):
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **options)
    return torch.stack(out.logits, dim=1)[0]


def continuously(model, requests: list[dict], make_inputs, steps: list[int], seed: int, options: dict):
    """Requests arrive in a seeded random order and number per step; those that arrive are prefilled together
    (left-padded) and merged into the running batch; a request leaves the step it has its `steps` logits.
    Returns each request's logits [steps, V] and the largest row count seen."""
    rng = random.Random(seed)
    waiting = list(range(len(requests)))
    rng.shuffle(waiting)
    running: DecodeBatch | None = None
    members: list[int] = []  # request of each row
    last: dict[int, torch.Tensor] = {}
    logits: dict[int, list] = {i: [] for i in range(len(requests))}
    widest = 0
    while waiting or members:
        arriving = [waiting.pop() for _ in range(min(len(waiting), rng.choice([0, 0, 1, 1, 2, 3])))]
        if not members and not arriving:
            arriving = [waiting.pop()]
        if arriving:
            joined, first = prefill_batch(model, make_inputs([requests[i] for i in arriving]), **options)
            for row, request in enumerate(arriving):
                logits[request].append(first[row])
            running = joined if running is None else merge_batches([running, joined])
            members += arriving
        elif running is not None:
            tokens = suppress(torch.stack([last[i] for i in members]), options)
            out = running.step(model, tokens)
            for row, request in enumerate(members):
                logits[request].append(out[row])
        for request in members:
            last[request] = logits[request][-1]
        widest = max(widest, len(members))
        staying = [row for row, request in enumerate(members) if len(logits[request]) < steps[request]]
        if len(staying) < len(members):
            if staying:
                running.select(staying)
                members = [members[row] for row in staying]
            else:
                running, members = None, []
    return {i: torch.stack(values) for i, values in logits.items()}, widest


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(("family_name", "method_name", "seed"), [
    ("llava", "corematching", 0),
    ("llava", "corematching", 1),
    ("llava", "tokens-only", 2),
    ("llava", "two-stages", 3),
    ("llava", "neurons-only", 4),
    ("llava", "dense", 5),
    ("qwen", "corematching", 6),
    ("qwen", "tokens-only", 7),
])
def test_requests_joining_and_leaving_equal_each_alone_and_the_oracle(family_name, method_name, seed):
    model, make_request, make_inputs, options = family(family_name)
    count = 7
    requests = [make_request(seed * 3 + i) for i in range(count)]
    rng = random.Random(seed)
    steps = [rng.choice([2, 3, 6, 9]) for _ in range(count)]
    make = METHODS[method_name]
    session = cm.sparsify(model, make()) if make is not None else None
    try:
        with torch.no_grad():
            expected, records = [], []
            for request, n in zip(requests, steps):
                expected.append(alone(model, make_inputs([request]), n, options))
                records.append(session.last if session is not None else None)
            got, widest = continuously(model, requests, make_inputs, steps, seed, options)
        if session is not None:
            session.remove()
        if make is not None and method_name != "neurons-only":
            kept = [int(record.keep_mask.sum()) for record in records]
            assert records[0].prune_layer is not None and len(set(kept)) > 1  # rows keep different counts
        with torch.no_grad():
            for index, (request, n) in enumerate(zip(requests, steps)):
                reference = oracle(model, make_inputs([request]), records[index], n, options)
                torch.testing.assert_close(expected[index], reference, atol=ATOL, rtol=0)
    finally:
        if session is not None:
            session.remove()
    assert widest >= 3  # several requests really decoded together
    for index in range(count):
        assert got[index].shape == expected[index].shape
        torch.testing.assert_close(got[index], expected[index], atol=ATOL, rtol=0)
        assert torch.equal(suppress(got[index], options), suppress(expected[index], options))


def test_text_only_requests_join_a_pruned_batch():
    """A request without an image (its cache holds every token, it decodes densely) shares decode steps with
    pruned ones that decode with core neurons."""
    model, _, _, options = family("llava")
    requests = [llava_request(0), llava_request(1, with_image=False), llava_request(2), llava_request(3, False)]
    steps = [5, 4, 3, 6]
    with torch.no_grad(), cm.sparsify(model, METHODS["corematching"]()):
        expected = [alone(model, llava_inputs([r]), n, options) for r, n in zip(requests, steps)]
        for seed in range(3):
            got, _ = continuously(model, requests, llava_inputs, steps, seed, options)
            for index in range(len(requests)):
                torch.testing.assert_close(got[index], expected[index], atol=ATOL, rtol=0)


def test_leaving_rows_give_back_their_padding():
    """When the longest conversation leaves, the slots only it needed are dropped: the batch is as long as the
    longest row left, and its KV memory shrinks."""
    model, _, _, options = family("llava")
    with torch.no_grad(), cm.sparsify(model, METHODS["corematching"]()):
        short, _ = prefill_batch(model, llava_inputs([llava_request(0)]))
        long, _ = prefill_batch(model, llava_inputs([llava_request(5)]))
        short_length, short_bytes = short.length, kv_bytes(short)
        assert long.length > short_length
        batch = merge_batches([short, long])
        merged_bytes = kv_bytes(batch)
        batch.select([0])
    assert batch.length == short_length
    assert kv_bytes(batch) == short_bytes < merged_bytes


def test_merging_refuses_caches_of_a_removed_session():
    model, _, _, _ = family("llava")
    with torch.no_grad():
        with cm.sparsify(model, METHODS["corematching"]()):
            first, _ = prefill_batch(model, llava_inputs([llava_request(0)]))
            second, _ = prefill_batch(model, llava_inputs([llava_request(1)]))
        with pytest.raises(cm.UnsupportedModeError, match="has been removed"):
            merge_batches([first, second])


def test_a_step_names_a_wrong_token_shape():
    model, _, _, _ = family("llava")
    with torch.no_grad():
        batch, _ = prefill_batch(model, llava_inputs([llava_request(0), llava_request(1)]))
        with pytest.raises(ValueError, match="one per row"):
            batch.step(model, torch.tensor([1]))
