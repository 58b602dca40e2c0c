"""Checks every model family's tests run on its tiny model: a session's generation against dense generation and
against the oracle (tests/oracle.py), a batch against each sample alone, and the model restored bit for bit.
Each check takes the family's model, its inputs and the placeholder tokens generation must not produce."""

import re

import pytest
import torch
from oracle import masked_reference, removed_mask

import corematching as cm

ATOL = 1e-5
STEPS = 4


def generate(model, inputs: dict, suppress: list[int], steps: int = STEPS, **options):
    """Greedy generation (options: more generate() arguments): (sequences [B, T + steps], logits [B, steps, V])."""
    out = model.generate(
        **inputs,
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        suppress_tokens=suppress,
        **options,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def check_keep_all_equals_dense(model, inputs: dict, suppress: list[int], method, steps: int = STEPS) -> None:
    """A method that keeps every visual token and every neuron (beta 1): the dense model's tokens and logits."""
    dense_tokens, dense_logits = generate(model, inputs, suppress, steps)
    with cm.sparsify(model, method) as session:
        tokens, logits = generate(model, inputs, suppress, steps)
        record = session.last
    assert torch.equal(record.keep_mask, record.keep_mask | record.visual_mask)  # nothing visual removed
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, atol=ATOL, rtol=0)


def check_against_oracle(model, language_model, inputs: dict, suppress: list[int], method, attn: str = "sdpa",
                         steps: int = STEPS, **options):
    """Generation under the session equals the oracle built from the session's record (removed tokens blocked
    after the prune layer, FFN zeroed outside the core neurons while decoding); returns the record.
    language_model: the decoder whose `.layers` the oracle hooks."""
    with cm.sparsify(model, method) as session:
        tokens, logits = generate(model, inputs, suppress, steps, **options)
        record = session.last
    length = inputs["input_ids"].shape[1]
    removed = removed_mask(record.keep_mask, record.visual_mask, length + steps)
    ffns = {layer: language_model.layers[layer].mlp for layer in record.neurons}
    reference = masked_reference(
        language_model, ffns, removed, record.prune_layer, record.core_neurons_per_sample, length, attn
    )
    with reference:
        expected_tokens, expected_logits = generate(model, inputs, suppress, steps, **options)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    return record


def method_makers(prune_layer: int, neuron_layers: list[int]):
    """A family's two CoreMatching settings: with_budget(budget, neurons=False) (beta 0.5, core neurons on
    `neuron_layers` when asked) and keep_all() (every visual token and every neuron kept)."""

    def with_budget(budget, neurons: bool = False) -> cm.CoreMatching:
        layers = list(neuron_layers) if neurons else []
        return cm.CoreMatching(prune_layer=prune_layer, token_budget=budget, beta=0.5, neuron_layers=layers)

    def keep_all() -> cm.CoreMatching:
        return cm.CoreMatching(prune_layer=prune_layer, token_budget=1.0, beta=1.0, neuron_layers=list(neuron_layers))

    return with_budget, keep_all


def kept_per_image_run(record, input_ids: torch.Tensor, image_token: int, image_tokens: list[int]) -> list[int]:
    """Visual tokens kept by each image of sample 0, its images covering image_tokens placeholders each."""
    kept = record.keep_mask[0][input_ids[0] == image_token]
    return [int(part.sum()) for part in kept.split(image_tokens)]


def kept_per_image(record, layout, row: int = 0) -> list[int]:
    """How many visual tokens of each image of sample `row` went past the prune layer."""
    kept = record.keep_mask[row] & record.visual_mask[row]
    image_index = layout.image_index[row]
    return [int((kept & (image_index == image)).sum()) for image in range(int(image_index.max()) + 1)]


def check_batch_equals_alone(model, batch: dict, alone: list[dict], suppress: list[int], method, **options) -> None:
    """A left-padded batch gives each sample the visual tokens, generated tokens and logits it gets alone
    (options: more generate() arguments, for both)."""
    with cm.sparsify(model, method) as session:
        tokens, logits = generate(model, batch, suppress, **options)
        batch_kept = session.last.kept_visual_positions
        for row, inputs in enumerate(alone):
            alone_tokens, alone_logits = generate(model, inputs, suppress, **options)
            pad = batch["input_ids"].shape[1] - inputs["input_ids"].shape[1]
            assert torch.equal(session.last.kept_visual_positions[0] + pad, batch_kept[row])
            assert torch.equal(tokens[row, -STEPS:], alone_tokens[0, -STEPS:])
            torch.testing.assert_close(logits[row], alone_logits[0], atol=ATOL, rtol=0)


def _snapshot(model) -> dict:
    return {
        "state": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "parameters": {name: (id(p), p.data_ptr()) for name, p in model.named_parameters()},
        "modules": [(name, id(module), type(module)) for name, module in model.named_modules()],
        "attributes": {name: set(vars(module)) for name, module in model.named_modules()},
        "hooks": {name: _hooks(module) for name, module in model.named_modules()},
    }


def _hooks(module) -> tuple:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    return tuple(dict(getattr(module, kind)) for kind in kinds)


def _assert_same(model, before: dict) -> None:
    after = _snapshot(model)
    for key in ("modules", "parameters", "attributes", "hooks"):
        assert after[key] == before[key], key
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name


class _Raised(Exception):
    pass


def check_restored(model, inputs: dict, suppress: list[int], method) -> None:
    """After the block, after an exception raised in the block, and after one raised inside a sparsified forward:
    the same weights, modules, attributes and hooks, and the dense model's logits."""
    generate(model, inputs, suppress, steps=1)  # transformers adds its own hooks lazily on a first call
    before = _snapshot(model)
    with torch.no_grad():
        dense_logits = model(**inputs).logits
    with cm.sparsify(model, method):
        generate(model, inputs, suppress, steps=2)
    _assert_same(model, before)

    with pytest.raises(_Raised), cm.sparsify(model, method):
        generate(model, inputs, suppress, steps=2)
        raise _Raised

    def fail(module, args):
        raise _Raised

    decoder_layer = re.compile(r"(^model|language_model|text_model)\.layers\.\d+$")
    decoder_layers = [module for name, module in model.named_modules() if decoder_layer.search(name)]
    last_layer = decoder_layers[-1]  # a layer after the prune layer, inside the sparsified forward
    handle = last_layer.register_forward_pre_hook(fail)
    try:
        with pytest.raises(_Raised), cm.sparsify(model, method):
            generate(model, inputs, suppress, steps=2)
    finally:
        handle.remove()
    _assert_same(model, before)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, dense_logits)


def check_draws_per_image(model, method, alone: dict, with_mate: dict, tokens_per_image: int) -> None:
    """`alone`: one sample of two images of the same layout (tokens_per_image tokens each) but different pixels;
    `with_mate`: a larger sample first, then the same one. A method seeded by each image's pixels (RandomTokens)
    keeps the same tokens beside the batch mate (shifted by its padding) and draws differently for the two images."""
    with cm.sparsify(model, method) as session, torch.no_grad():
        model(**alone)
        record = session.last
        model(**with_mate)
        in_batch = session.last.kept_visual_positions[1]
    pad = in_batch.max() - record.kept_visual_positions[0].max()
    assert torch.equal(in_batch, record.kept_visual_positions[0] + pad)
    kept = record.keep_mask[0][record.visual_mask[0]]
    assert not torch.equal(kept[:tokens_per_image], kept[tokens_per_image:])  # different pixels, different draws
