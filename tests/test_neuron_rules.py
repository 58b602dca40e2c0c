"""Neuron-choice rules against naive per-element references, and the CoreMatching fields that use them."""

import math

import pytest
import torch

import corematching as cm
from corematching import neuron_rules, selection


def small_activations(seed: int, batch=2, tokens=5, width=12) -> torch.Tensor:
    """Signed activations on a coarse grid, so that frequencies and sums tie often."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (batch, tokens, width), generator=generator).to(torch.float32) / 2


def naive_token_core(values: list[float], rho: float) -> set[int]:
    positive = [n for n, v in enumerate(values) if v > 0]
    k = math.ceil(round(rho * len(positive), 9))
    return set(sorted(positive, key=lambda n: (-values[n], n))[:k])


def naive_frequency_ranking(acts, mask, rho, transform) -> list[int]:
    """Neurons best first: frequency among C_rho(transform(a)), then sum of transform(a), then index."""
    width = len(acts[0])
    rows = [[transform(v) for v in acts[t]] for t in range(len(acts)) if mask[t]]
    frequency = [0] * width
    total = [0.0] * width
    for row in rows:
        for n in naive_token_core(row, rho):
            frequency[n] += 1
        for n in range(width):
            total[n] += row[n]
    return sorted(range(width), key=lambda n: (-frequency[n], -total[n], n))


def naive_mass_ranking(acts, mask) -> list[int]:
    width = len(acts[0])
    mass = [sum(abs(acts[t][n]) for t in range(len(acts)) if mask[t]) for n in range(width)]
    return sorted(range(width), key=lambda n: (-mass[n], n))


def token_mask_for(batch, tokens) -> torch.Tensor:
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[1, -2:] = False  # padding in the second sample
    return mask


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("count", [1, 5, 12])
def test_rules_match_naive_references(seed, count):
    activations = small_activations(seed)
    mask = token_mask_for(*activations.shape[:2])
    references = {
        "paper": lambda acts, m: naive_frequency_ranking(acts, m, 0.3, lambda v: v),
        "magnitude": lambda acts, m: naive_frequency_ranking(acts, m, 0.3, abs),
        "mass": naive_mass_ranking,
    }
    for rule, reference in references.items():
        chosen = neuron_rules.select(rule, activations, mask, count, rho=0.3)
        assert chosen.shape == (2, count)
        for b in range(2):
            expected = sorted(reference(activations[b].tolist(), mask[b].tolist())[:count])
            assert chosen[b].tolist() == expected, rule


def test_padding_never_changes_a_choice():
    activations = small_activations(7)
    mask = token_mask_for(*activations.shape[:2])
    noisy = activations.clone()
    noisy[1, -2:] = 100.0  # huge values on the padded tokens only
    for rule in neuron_rules.RULES:
        assert torch.equal(neuron_rules.select(rule, activations, mask, 4), neuron_rules.select(rule, noisy, mask, 4))


@pytest.mark.parametrize("beta", [0.25, 0.4, 1.0])
def test_paper_rule_is_the_sentence_core_neurons(beta):
    activations = small_activations(3, width=20)
    mask = token_mask_for(*activations.shape[:2])
    expected = selection.sentence_core_neurons(selection.token_core_neurons(activations, 0.2), activations, mask, beta)
    count = neuron_rules.neuron_count(20, beta)
    assert torch.equal(neuron_rules.select("paper", activations, mask, count, rho=0.2), expected)


def test_neuron_count_is_an_exact_ceiling():
    assert neuron_rules.neuron_count(5, 0.2) == 1
    assert neuron_rules.neuron_count(1536, 0.75) == 1152
    assert neuron_rules.neuron_count(10, 0.01) == 1
    assert neuron_rules.neuron_count(10, 0.91) == 10


def test_merge_hot_matches_naive():
    generator = torch.Generator().manual_seed(0)
    width, count, hot_count = 16, 7, 3
    hot_order = torch.randperm(width, generator=generator)
    prompt_order = torch.stack([torch.randperm(width, generator=generator) for _ in range(3)])
    merged = neuron_rules.merge_hot(hot_order, prompt_order, count, hot_count)
    for b in range(3):
        chosen = hot_order[:hot_count].tolist()
        for n in prompt_order[b].tolist():
            if len(chosen) == count:
                break
            if n not in chosen:
                chosen.append(n)
        assert merged[b].tolist() == sorted(chosen)


def test_top_magnitude_mask_matches_naive():
    values = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(1))
    mask = neuron_rules.top_magnitude_mask(values, 3)
    for row, row_mask in zip(values.reshape(-1, 10), mask.reshape(-1, 10)):
        largest = sorted(range(10), key=lambda n: -abs(row[n].item()))[:3]
        assert row_mask.nonzero().flatten().tolist() == sorted(largest)


def test_refreshed_masks_match_a_step_by_step_reference():
    generator = torch.Generator().manual_seed(2)
    batch, steps, width, count, every = 2, 7, 9, 4, 3
    prompt_mass = torch.rand(batch, width, generator=generator)
    decode = torch.randn(batch, steps, width, generator=generator)
    refresh = torch.arange(steps) % every == 0
    carry = (torch.zeros(batch, width), torch.zeros(()))
    # the whole run in one call, and split into two calls with the carry between them
    masks, _ = neuron_rules.refreshed_masks(prompt_mass, decode, refresh, count, carry)
    first, carry_mid = neuron_rules.refreshed_masks(prompt_mass, decode[:, :4], refresh[:4], count, carry)
    second, _ = neuron_rules.refreshed_masks(prompt_mass, decode[:, 4:], refresh[4:], count, carry_mid)
    assert torch.equal(torch.cat([first, second], 1), masks)
    for b in range(batch):
        seen = []
        for t in range(steps):
            if t % every == 0:
                seen.append(decode[b, t].abs())
            generated = torch.stack(seen).mean(0)
            scores = prompt_mass[b] + generated
            expected = sorted(sorted(range(width), key=lambda n: -scores[n].item())[:count])
            assert masks[b, t].nonzero().flatten().tolist() == expected


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="neuron_rule"):
        neuron_rules.select("random", small_activations(0), torch.ones(2, 5, dtype=torch.bool), 3)


# ---------------------------------------------------------------------------------------------- the method


def test_core_matching_validates_neuron_fields(tmp_path):
    with pytest.raises(ValueError, match="neuron_rule"):
        cm.CoreMatching(neuron_rule="teal")
    with pytest.raises(ValueError, match="neuron_budgets"):
        cm.CoreMatching(neuron_budgets={3: 1.5})
    with pytest.raises(ValueError, match="neuron_budgets"):
        cm.CoreMatching(neuron_budgets={-1: 0.5})
    with pytest.raises(ValueError, match="neuron_budgets"):
        cm.CoreMatching(neuron_budgets={"two": 0.5})
    with pytest.raises(ValueError, match="neuron_budgets"):
        cm.CoreMatching(neuron_budgets=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="neuron_budgets"):
        cm.CoreMatching(neuron_budgets=[0.5, 0.5])


def test_core_matching_decodes_with_per_layer_budgets(tmp_path):
    path = tmp_path / "budgets.json"
    path.write_text('{"budgets": {"2": 0.5, "4": 0.25, "5": 1.0}, "rule": "mass"}')
    method = cm.CoreMatching(neuron_budgets=str(path), neuron_rule="mass")
    assert method.neuron_layer_indices(8) == (2, 4)  # a share of 1 decodes densely
    activations = small_activations(5, width=16)
    mask = token_mask_for(*activations.shape[:2])
    for layer, share in ((2, 0.5), (4, 0.25)):
        chosen = method.select_neurons(activations, mask, layer)
        assert chosen.shape == (2, neuron_rules.neuron_count(16, share))
        assert torch.equal(chosen, neuron_rules.select("mass", activations, mask, chosen.shape[1]))
    explicit = cm.CoreMatching(neuron_budgets={2: 0.5}, neuron_layers=[2, 3], beta=0.25)
    assert explicit.neuron_layer_indices(8) == (2, 3)
    assert explicit.select_neurons(activations, mask, 3).shape == (2, 4)  # no budget: beta of the width


def test_default_rule_is_unchanged_c_beta():
    activations = small_activations(6, width=20)
    mask = token_mask_for(*activations.shape[:2])
    method = cm.CoreMatching(beta=0.4)
    expected = selection.sentence_core_neurons(selection.token_core_neurons(activations, 0.2), activations, mask, 0.4)
    assert torch.equal(method.select_neurons(activations, mask, 3), expected)
