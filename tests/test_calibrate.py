"""cm.calibrate: the knapsack against brute force, the masked decode path against a sliced FFN, budgets that
follow the layers' sensitivity on a constructed tiny model, the JSON round trip, the cache and bad input."""

import importlib
import itertools
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import corematching as cm
from corematching import neuron_rules

cal = importlib.import_module("corematching.calibrate")  # the module; cm.calibrate is the function


def tiny_llama(seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def prompts(count=3, length=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (length,), generator=generator) for _ in range(count)]


# ---------------------------------------------------------------------------------------------- allocation


def brute_force(sensitivity, num_layers, max_units):
    """Least summed (monotone, clamped) sensitivity over every combination of grid shares within max_units."""
    best = None
    for combo in itertools.product(*[[1.0] + sorted(sensitivity.get(layer, {})) for layer in range(num_layers)]):
        units = sum(round(share * 10) for share in combo)
        if units > max_units:
            continue
        cost = 0.0
        for layer, share in enumerate(combo):
            if share < 1:
                row = sensitivity[layer]
                cost += max(max(row[s] for s in row if s >= share), 0.0)
        if best is None or cost < best[0] - 1e-12 or (abs(cost - best[0]) <= 1e-12 and units < best[1]):
            best = (cost, units)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_allocate_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    shares = (0.3, 0.6, 0.8)
    sensitivity = {layer: {s: float(torch.rand((), generator=generator)) - 0.1 for s in shares} for layer in range(4)}
    for max_units in (14, 25, 33):
        budgets = cal.allocate(sensitivity, 4, max_units=max_units)
        units = sum(round(budgets.get(layer, 1.0) * 10) for layer in range(4))
        cost = sum(
            max(max(sensitivity[layer][s] for s in shares if s >= q), 0.0) for layer, q in budgets.items()
        )
        best_cost, _ = brute_force(sensitivity, 4, max_units)
        assert units <= max_units
        assert cost == pytest.approx(best_cost, abs=1e-9)


def test_allocate_spends_on_the_sensitive_layer():
    sensitivity = {0: {0.5: 1.0, 0.8: 0.3}, 1: {0.5: 0.02, 0.8: 0.01}}
    budgets = cal.allocate(sensitivity, 2, max_units=15)
    assert budgets == {1: 0.5}  # the cheap layer takes the cut, the sensitive one stays dense
    assert cal.allocate(sensitivity, 2, max_increase=0.015) == {1: 0.8}
    assert cal.allocate(sensitivity, 2, max_increase=0.0) == {}
    assert cal.flops_saved({1: 0.5}, 2) == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------- the decode path


def test_masked_activation_equals_a_sliced_ffn_and_hooks_come_off():
    model = tiny_llama()
    ids = prompts(1, 30)[0][None]
    before = model(input_ids=ids).logits
    with cal.MaskedFFNs(model) as ffns:
        prompt = cal.prefill(model, ffns, ids[:, :20], ids[:, 20:])
        chosen = {layer: neuron_rules.select("mass", a, torch.ones(a.shape[:2], dtype=torch.bool), 15)[0]
                  for layer, a in prompt.activations.items()}
        masks = {layer: torch.zeros(1, 40, dtype=torch.bool).index_fill_(1, idx, True) for layer, idx in chosen.items()}
        ffns.policy = cal.StaticMasks(masks)
        masked = model(input_ids=ids[:, 20:], cache=cal.expanded_cache(prompt.cache, 1)).logits
        ffns.policy = None
    # reference: dense prefill, then the FFNs replaced by their sliced weights (computed by hand)
    prefill_out = model(input_ids=ids[:, :20], use_cache=True)
    for layer, idx in chosen.items():
        mlp = model.model.layers[layer].mlp
        gate, up, down = mlp.gate_proj.weight[idx], mlp.up_proj.weight[idx], mlp.down_proj.weight[:, idx]
        mlp.forward = lambda x, g=gate, u=up, d=down, act=mlp.act_fn: (act(x @ g.T) * (x @ u.T)) @ d.T
    try:
        sliced = model(input_ids=ids[:, 20:], cache=prefill_out.cache).logits
    finally:
        for layer in chosen:
            del model.model.layers[layer].mlp.forward
    torch.testing.assert_close(masked, sliced, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked, before[:, 20:], atol=1e-3)  # the sparsity did change the output
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)  # hooks are gone


# ---------------------------------------------------------------------------------------------- calibrate


def model_with_a_quiet_layer() -> LlamaForCausalLM:
    """Layer 1's FFN output is scaled down 100x: dropping its neurons hurts far less than layer 0's or 2's."""
    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.01)
        for layer in (0, 2):
            model.model.layers[layer].mlp.down_proj.weight.mul_(3.0)
    return model


@torch.no_grad()
def greedy_prompts(model, count=3, context=28, continuation=12):
    """Random contexts followed by the model's own greedy continuation: any change to the model raises their
    NLL, so the sensitivities are positive and ordered by how much a layer matters."""
    result = []
    for ids in prompts(count, context):
        ids = ids[None]
        for _ in range(continuation):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        result.append(ids[0])
    return result


def test_calibrate_gives_the_quiet_layer_the_smaller_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("CM_CACHE", str(tmp_path))
    model = model_with_a_quiet_layer()
    calibration_prompts = greedy_prompts(model)
    result = cm.calibrate(model, calibration_prompts, tolerance=0.05, shares=(0.3, 0.6, 0.9), continuation_tokens=12)
    assert result.sensitivity[1][0.3] < min(result.sensitivity[0][0.3], result.sensitivity[2][0.3])
    assert result.budgets.get(1, 1.0) < min(result.budgets.get(0, 1.0), result.budgets.get(2, 1.0))
    assert 0 < result.flops_saved <= 1
    assert result.perplexity_increase <= 0.05
    assert result.num_layers == 3 and result.rule == "mass"
    # the JSON on disk is the cache, and a method loads it
    files = list((tmp_path / "calibration").glob("*.json"))
    assert len(files) == 1
    assert cal.Calibration.load(files[0]) == result
    method = cm.CoreMatching(neuron_budgets=str(files[0]), neuron_rule="mass")
    assert method.neuron_layer_indices(3) == tuple(layer for layer, share in result.budgets.items() if share < 1)
    # a second call reads the cache: no forward pass runs
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        again = cm.calibrate(model, calibration_prompts, tolerance=0.05, shares=(0.3, 0.6, 0.9),
                             continuation_tokens=12)
    finally:
        handle.remove()
    assert again == result and not calls


def test_calibration_json_round_trip(tmp_path):
    result = cal.Calibration(budgets={3: 0.5, 7: 0.9}, rule="mass", tolerance=0.1, flops_saved=0.02,
                             perplexity_increase=0.04, model="abc", num_layers=30,
                             sensitivity={3: {0.5: 0.01, 0.9: 0.0}})
    path = result.save(tmp_path / "c.json")
    assert json.loads(path.read_text())["budgets"] == {"3": 0.5, "7": 0.9}
    assert cal.Calibration.load(path) == result
    assert cal.read_budgets(result) == {3: 0.5, 7: 0.9}
    assert cal.read_budgets(result.to_json()) == {3: 0.5, 7: 0.9}


def test_calibrate_refuses_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="tolerance"):
        cm.calibrate(model, prompts(), tolerance=0)
    with pytest.raises(ValueError, match="rule"):
        cm.calibrate(model, prompts(), rule="teal")
    with pytest.raises(ValueError, match="continuation_tokens"):
        cm.calibrate(model, [torch.arange(10)], continuation_tokens=8, use_cache=False)
    with pytest.raises(ValueError, match="tokenizer"):
        cm.calibrate(model, ["some text"], use_cache=False)
    with pytest.raises(ValueError, match="shares"):
        cm.calibrate(model, prompts(), shares=(0.35,))
    with pytest.raises(ValueError, match="prompts"):
        cm.calibrate(model, "one string")
