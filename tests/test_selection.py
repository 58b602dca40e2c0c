"""The selection math against small hand-computed cases and a naive per-token reference."""

import pytest
import torch
from reference import naive_elbow_count, naive_sentence_core, naive_token_core

from corematching import selection
from corematching.methods import RandomTokens, TokenBatch, UniformTokens
from corematching.methods.uniform_tokens import evenly_spaced, grid_selection

pytestmark = pytest.mark.usefixtures("one_thread")


def members(mask_row: torch.Tensor) -> set[int]:
    return set(mask_row.nonzero().flatten().tolist())


# ---------------------------------------------------------------------------------------------- C_rho


@pytest.mark.parametrize(
    "values, rho, expected",
    [
        ([3.0, -1.0, 2.0, 0.0, 5.0, 1.0], 0.5, {0, 4}),  # P = {0, 2, 4, 5}, k = 2
        ([2.0, 2.0, 2.0, 1.0], 0.5, {0, 1}),  # three tied at the threshold: lower indices first
        ([1.0, 2.0, 2.0, 2.0], 0.5, {1, 2}),
        ([-1.0, 0.0, -2.0], 0.7, set()),  # no positive activation: empty
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0.2, {4}),  # ceil(0.2 * 5) is 1, not 2
        ([1.0, -2.0, 3.0], 1.0, {0, 2}),  # rho = 1: every positive neuron
        ([0.5, 0.1, 0.2], 0.01, {0}),  # at least one neuron when P is not empty
    ],
)
def test_token_core_neurons_hand_cases(values, rho, expected):
    core = selection.token_core_neurons(torch.tensor([[values]]), rho)
    assert core.shape == (1, 1, len(values))
    assert members(core[0, 0]) == expected


def test_token_core_neurons_match_naive_on_random_rows():
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(2, 7, 40, generator=generator).round(decimals=1)  # rounding creates ties
    for rho in (0.2, 0.5, 1.0):
        core = selection.token_core_neurons(activations, rho)
        for b in range(2):
            for t in range(7):
                assert members(core[b, t]) == naive_token_core(activations[b, t].tolist(), rho)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "values, rho",
    [
        ([1.0] * 10, 0.2),  # all tied: k = K = 2 of ten equal values, the two lowest indices
        ([0.5] * 9 + [3.0], 0.2),  # the threshold's ties lie outside the largest K = 2 but one: index 0 wins
        ([2.0, 0.5, 0.5, 2.0, 0.5, 0.5, 0.5, 2.0, 0.5, 0.5], 0.5),  # k = 5: the three 2.0 and the first two 0.5
        # few positives among negatives of very different sizes, -0.0 and +0.0 (their bits order them otherwise)
        ([-1e30, 3.0, -1e-30, -0.0, 0.0, 1.0, -2.0, 2.0, -65000.0, -1e-3] + [-1.0] * 10, 0.5),
        ([-0.0, 0.0, -1.0, 0.0, -0.0], 0.5),  # no positive activation: empty
        ([1e-40, -1e-40, 0.0, 5e-39], 1.0),  # subnormal positives (flushed to 0 in half precision)
        ([0.25, 0.25, -0.25, 0.25, 1.0, 1.0], 0.4),  # k = 2 of five positives, tied at the top
    ],
)
def test_token_core_neurons_adversarial_ties_and_signs(values, rho, dtype):
    row = torch.tensor(values, dtype=torch.float64).to(dtype)
    core = selection.token_core_neurons(row.view(1, 1, -1), rho)
    assert members(core[0, 0]) == naive_token_core(row.double().tolist(), rho)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_token_core_neurons_match_naive_with_heavy_ties_in_every_dtype(dtype):
    generator = torch.Generator().manual_seed(5)
    # small integers: many positives tie at the threshold, many of them outside the row's K largest
    activations = torch.randint(-3, 4, (3, 6, 200), generator=generator).to(dtype)
    activations[0, 0] = 2.0  # a row of one value
    activations[1, 2] = -1.0  # a row without positives
    for rho in (0.05, 0.2, 0.5, 1.0):
        core = selection.token_core_neurons(activations, rho)
        for b in range(3):
            for t in range(6):
                assert members(core[b, t]) == naive_token_core(activations[b, t].double().tolist(), rho)


def test_token_core_neurons_refuse_a_non_float_dtype():
    with pytest.raises(ValueError, match="activations must be float16, bfloat16, float32 or float64"):
        selection.token_core_neurons(torch.ones(1, 2, 4, dtype=torch.int32), 0.5)


def test_kth_largest_per_row():
    values = torch.tensor([[5, -1, 3, 3], [0, 7, 2, -4], [1, 1, 1, 1]], dtype=torch.int32)
    k = torch.tensor([3, 1, 0])
    result = selection.kth_largest(values, k)
    assert result[:2].tolist() == [3, 7]
    assert int(result[2]) == torch.iinfo(torch.int32).max  # k = 0: above every entry


# ---------------------------------------------------------------------------------------------- C_beta


def test_sentence_core_neurons_hand_case():
    # token x0: C = {0, 1}; x1: C = {1, 2}; x2 (outside S): C = {3}
    activations = torch.tensor([[[1.0, 1.0, 0.5, -1.0], [0.2, 2.0, 3.0, -1.0], [0.0, 0.0, 0.0, 9.0]]])
    token_core = torch.tensor([[[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]]], dtype=torch.bool)
    in_set = torch.tensor([[True, True, False]])
    # f = (1, 2, 1, 0); n1 first, then n0 and n2 tie on f: n2 has the larger sum (3.5 > 1.2)
    chosen = selection.sentence_core_neurons(token_core, activations, in_set, beta=0.5)
    assert chosen.tolist() == [[1, 2]]


def test_sentence_core_neurons_tie_on_count_and_sum_goes_to_lower_index():
    activations = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    token_core = torch.tensor([[[1, 0, 1, 0]]], dtype=torch.bool)
    chosen = selection.sentence_core_neurons(token_core, activations, torch.tensor([[True]]), beta=0.25)
    assert chosen.tolist() == [[0]]


def test_sentence_core_neurons_empty_set_gives_lowest_indices():
    activations = torch.randn(1, 3, 10)
    token_core = selection.token_core_neurons(activations, 0.5)
    chosen = selection.sentence_core_neurons(token_core, activations, torch.zeros(1, 3, dtype=torch.bool), 0.3)
    assert chosen.tolist() == [[0, 1, 2]]


def test_sentence_core_neurons_match_naive_and_ignore_padding():
    generator = torch.Generator().manual_seed(1)
    activations = torch.randn(1, 9, 30, generator=generator).round(decimals=1)
    token_mask = torch.tensor([[False, False, True, True, True, False, True, True, True]])
    tokens = token_mask[0].nonzero().flatten().tolist()
    token_core = selection.token_core_neurons(activations, 0.3)
    chosen = selection.sentence_core_neurons(token_core, activations, token_mask, 0.4)
    assert chosen[0].tolist() == naive_sentence_core(activations[0], tokens, 0.3, 0.4)
    # the same sample with other values at the masked positions, and in a batch: same result
    noisy = activations.clone()
    noisy[0, ~token_mask[0]] = 100.0
    batched = torch.cat([torch.randn(1, 9, 30, generator=generator), noisy])
    mask2 = torch.cat([torch.ones(1, 9, dtype=torch.bool), token_mask])
    chosen2 = selection.sentence_core_neurons(selection.token_core_neurons(batched, 0.3), batched, mask2, 0.4)
    assert torch.equal(chosen2[1], chosen[0])


def test_match_scores_count_the_intersection():
    token_core = torch.tensor([[[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]]], dtype=torch.bool)
    core = selection.neuron_mask(torch.tensor([[1, 3]]), 4)
    assert selection.match_scores(token_core, core).tolist() == [[1, 2, 0]]


def test_last_token_mask_with_left_padding():
    valid = torch.tensor([[False, True, True], [True, True, True], [False, False, False]])
    assert selection.last_token_mask(valid).tolist() == [
        [False, False, True],
        [False, False, True],
        [False, False, False],
    ]


# ---------------------------------------------------------------------------------------------- budgets


def groups_of(*labels):
    return torch.tensor([list(labels)])


def kept(mask):
    return mask[0].nonzero().flatten().tolist()


def test_top_m_ties_go_to_lower_position():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    groups = groups_of(0, 0, 0, 0)
    assert kept(selection.select_by_score(scores, groups, 2)) == [1, 2]
    assert kept(selection.select_by_score(scores, groups, 1)) == [1]
    scores = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    assert kept(selection.select_by_score(scores, groups, 3)) == [0, 1, 2]


def test_top_m_per_image_and_outside_tokens():
    scores = torch.tensor([[9.0, 5.0, 1.0, 9.0, 1.0, 5.0, 7.0]])
    groups = groups_of(-1, 0, 0, -1, 1, 1, 1)
    assert kept(selection.select_by_score(scores, groups, 1)) == [1, 6]
    assert kept(selection.select_by_score(scores, groups, 10)) == [1, 2, 4, 5, 6]  # larger than an image: all


def test_fractional_budget_is_exact():
    scores = torch.arange(5.0).unsqueeze(0)
    groups = groups_of(0, 0, 0, 0, 0)
    assert kept(selection.select_by_score(scores, groups, 0.2)) == [4]  # ceil(0.2 * 5) == 1
    assert kept(selection.select_by_score(scores, groups, 0.5)) == [2, 3, 4]  # ceil(2.5) == 3
    assert kept(selection.select_by_score(scores, groups, 1.0)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "curve, expected",
    [
        # x = rank / (n - 1), y = (s - min) / (max - min); the point with the largest |x + y - 1| sets the
        # threshold and every score >= it is kept
        ([10, 2, 1.5, 1, 0.5, 0], 2),  # |x+y-1| = 0, .6, .45, .3, .15, 0 -> rank 1 (score 2)
        ([10, 9, 1, 1, 0], 4),  # 0, .15, .4, .15, 0 -> rank 2 (score 1): four scores >= 1
        ([9, 8, 7, 1, 1, 0], 5),  # 0, .09, .18, .29, .09, 0 -> rank 3 (score 1)
        ([10, 0, 0, 0, 0], 5),  # rank 1 opens a plateau of zeros: the whole plateau is kept
        ([5, 5, 5, 0], 3),  # 0, 1/3, 2/3, 0 -> rank 2 (score 5)
        ([3, 3, 3], 3),  # flat: keep all
        ([7], 1),
    ],
)
def test_elbow_hand_cases(curve, expected):
    assert naive_elbow_count(curve) == expected
    scores = torch.tensor([curve], dtype=torch.float32)
    groups = torch.zeros_like(scores, dtype=torch.long)
    assert len(kept(selection.select_by_score(scores, groups, None))) == expected


def test_elbow_keeps_the_best_positions_and_respects_min_tokens():
    scores = torch.tensor([[1.0, 10.0, 0.5, 2.0, 0.0, 1.5]])
    groups = groups_of(0, 0, 0, 0, 0, 0)
    assert kept(selection.select_by_score(scores, groups, None)) == [1, 3]
    assert kept(selection.select_by_score(scores, groups, None, min_tokens=3)) == [1, 3, 5]


def test_elbow_is_per_image():
    scores = torch.tensor([[5.0, 5.0, 5.0, 10.0, 2.0, 1.5, 1.0, 0.0]])
    groups = groups_of(0, 0, 0, 1, 1, 1, 1, 1)
    # image 0 is flat (all kept); image 1: |x+y-1| = 0, .55, .4, .15, 0 -> rank 1 (score 2)
    assert kept(selection.select_by_score(scores, groups, None)) == [0, 1, 2, 3, 4]


def test_ceil_ratio_is_exact():
    assert selection.ceil_ratio(5, 0.2) == 1
    assert selection.ceil_ratio(30, 0.1) == 3
    assert selection.ceil_ratio(torch.tensor([0, 1, 5, 6]), 0.4).tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------- baselines


def visual_batch(num_visual: int, grid=None, prefix: int = 2, batch: int = 1) -> TokenBatch:
    length = prefix + num_visual + 1
    visual = torch.zeros(batch, length, dtype=torch.bool)
    visual[:, prefix : prefix + num_visual] = True
    ordinal = torch.full((batch, length), -1)
    ordinal[:, prefix : prefix + num_visual] = torch.arange(num_visual)
    index = torch.where(visual, 0, -1)
    return TokenBatch(torch.ones_like(visual), visual, index, ordinal, grid, None)


def test_evenly_spaced_is_centered():
    length, count = torch.tensor(10), torch.tensor(3)
    picks = [i for i in range(10) if evenly_spaced(torch.tensor(i), length, count)]
    assert picks == [1, 5, 8]  # floor((i + 1/2) * 10 / 3)


@pytest.mark.parametrize(
    "count, expected",
    [
        (4, {(1, 1), (1, 4), (4, 1), (4, 4)}),
        (9, {(r, c) for r in (1, 3, 5) for c in (1, 3, 5)}),
        (36, {(r, c) for r in range(6) for c in range(6)}),
        (1, {(3, 3)}),
    ],
)
def test_grid_selection_is_two_dimensional(count, expected):
    ordinal = torch.arange(36)
    picked = grid_selection(ordinal, 6, 6, torch.full_like(ordinal, count))
    assert {(int(o) // 6, int(o) % 6) for o in ordinal[picked]} == expected


@pytest.mark.parametrize("count", [1, 2, 5, 7, 11, 17, 30, 35])
def test_grid_selection_keeps_exactly_the_budget_spread_over_rows(count):
    ordinal = torch.arange(36)
    picked = grid_selection(ordinal, 6, 6, torch.full_like(ordinal, count))
    assert int(picked.sum()) == count
    rows, per_row = (ordinal[picked] // 6).unique(return_counts=True)
    assert len(rows) == min(max(round(count**0.5), -(-count // 6)), 6)  # about sqrt(count) rows
    assert int(per_row.max() - per_row.min()) <= 1  # spread evenly over them


def test_uniform_tokens_method_uses_the_grid_and_falls_back_to_one_axis():
    decision = UniformTokens(token_budget=4, prune_layer=0).select_tokens(visual_batch(36, grid=(6, 6)))
    positions = (decision.keep_visual[0].nonzero().flatten() - 2).tolist()
    assert positions == [7, 10, 25, 28]  # (1,1), (1,4), (4,1), (4,4)
    decision = UniformTokens(token_budget=3, prune_layer=0).select_tokens(visual_batch(10, grid=(6, 6)))
    assert (decision.keep_visual[0].nonzero().flatten() - 2).tolist() == [1, 5, 8]
    decision = UniformTokens(token_budget=0.25, prune_layer=0).select_tokens(visual_batch(36, grid=(6, 6)))
    assert int(decision.keep_visual.sum()) == 9


def test_random_tokens_are_seeded_and_batch_independent():
    method = RandomTokens(token_budget=5, seed=3, prune_layer=0)
    alone = method.select_tokens(visual_batch(36)).keep_visual
    assert int(alone.sum()) == 5
    again = method.select_tokens(visual_batch(36)).keep_visual
    assert torch.equal(alone, again)
    other = RandomTokens(token_budget=5, seed=4, prune_layer=0).select_tokens(visual_batch(36)).keep_visual
    assert not torch.equal(alone, other)
    shifted = method.select_tokens(visual_batch(36, prefix=6, batch=2)).keep_visual
    assert torch.equal(shifted[1, 6:42], alone[0, 2:38])
