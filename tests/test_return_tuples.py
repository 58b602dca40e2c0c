"""Calls with return_dict=False: the KV cache inside the returned tuple carries the session's decisions, so a later
call on it continues exactly as from the cache of a ModelOutput."""

import pytest
import torch
from tiny_llava import build_pixels, build_prompt

import corematching as cm

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3


def method():
    return cm.CoreMatching(prune_layer=1, token_budget=8, beta=0.5, neuron_layers=[0, 1, 2, 3])


@torch.no_grad()
def decode(module, inputs, return_dict: bool, steps: int = STEPS) -> list[torch.Tensor]:
    """A prefill then `steps` single-token calls on the cache it returned (next input: a fixed token, so both
    ways feed the same tokens): the last hidden state of each call."""
    out = module(**inputs, use_cache=True, return_dict=return_dict)
    hidden, cache = (out[0], out[1]) if not return_dict else (out.last_hidden_state, out.cache)
    mask, seen = inputs["attention_mask"], [hidden[:, -1]]
    for step in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = module(input_ids=torch.tensor([[5 + step]]), attention_mask=mask, cache=cache, use_cache=True,
                     return_dict=return_dict)
        hidden = out[0] if not return_dict else out.last_hidden_state
        seen.append(hidden[:, -1])
    return seen


def test_a_tuple_outputs_cache_continues_like_a_model_outputs(tiny_llava):
    """The language model's entry module called directly (what a custom decoding loop does)."""
    model = tiny_llava()
    prompt = build_prompt(3, 5, seed=0)
    inputs = {"input_ids": prompt.unsqueeze(0), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
              "pixel_values": build_pixels(1, seed=0)}
    with cm.sparsify(model, method()):
        as_output = decode(model.model, inputs, return_dict=True)
        as_tuple = decode(model.model, inputs, return_dict=False)
    for got, expected in zip(as_tuple, as_output):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
