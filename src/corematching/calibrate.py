"""Per-layer neuron budgets for core-neuron decoding, measured on a few prompts.

`calibrate(model, prompts, tolerance=0.1)` splits every prompt into a context (prefilled densely, as the
session does) and a held-out continuation (decoded teacher-forced), then

1. measures each layer's sensitivity: the increase of the continuation's mean negative log-likelihood (NLL)
   when only that layer decodes with `share` of its FFN neurons (chosen by `rule` from the context), for each
   share of a grid;
2. allocates budgets: the per-layer shares with the fewest decode FFN FLOPs whose summed sensitivities stay
   within log(1 + tolerance) (an exact multiple-choice knapsack over the grid);
3. checks the allocation with every layer sparse at once, and tightens the allowance until the measured
   perplexity increase is within the tolerance (sensitivities do not add up exactly).

The result, a `Calibration`, is plain JSON (`save`/`load`); `cm.CoreMatching(neuron_budgets=...)` takes it,
its path or its `budgets` dict. Results are cached per model, prompts and settings under
`$CM_CACHE/calibration/` (default `~/.cache/corematching/calibration/`).

Decoding with a subset C of neurons is computed here by zeroing the activation a(x) outside C before
down_proj: act(x W_g[C]ᵀ) * (x W_u[C]ᵀ) W_d[:, C]ᵀ equals W_d (a(x) * 1_C), so the numbers are those of the
sliced FFN of the session, without gathering weights for each candidate.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import neuron_rules
from .methods.neuron_budgets import FORMAT_VERSION, Calibration, read_budgets  # noqa: F401 (public here too)

DEFAULT_SHARES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SHARE_STEP = 0.1  # the knapsack's unit: every share of the grid is a multiple of it


# ---------------------------------------------------------------------------------------------- the model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM or of a LLaVA-style VLM's language model."""
    inner = getattr(model, "model", model)
    for owner in (getattr(inner, "language_model", None), inner, getattr(model, "language_model", None)):
        layers = getattr(owner, "layers", None)
        if layers is not None:
            missing = [name for name in ("gate_proj", "up_proj", "down_proj", "act_fn")
                       if not hasattr(getattr(layers[0], "mlp", None), name)]
            if missing:
                raise ValueError(f"{type(model).__name__}: the FFN has no {', '.join(missing)} (a gated FFN is needed)")
            return list(layers)
    raise ValueError(f"{type(model).__name__}: no decoder layers found (model.model.layers or "
                     "model.model.language_model.layers)")


def fingerprint(model: nn.Module) -> str:
    """A short hash of the model's FFN weights (a sample of each) and shapes: identifies it across runs."""
    digest = hashlib.sha256()
    for layer in decoder_layers(model):
        for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            weight = linear.weight.detach()
            digest.update(str(tuple(weight.shape)).encode())
            digest.update(weight.reshape(-1)[:: max(1, weight.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class MaskedFFNs:
    """Hooks on every layer's FFN: record the activations a(x), or mask the FFN input and a(x) by a policy.

    policy.activation(layer, a [R, T, F], start) -> a' and policy.ffn_input(layer, x [R, T, H], start) -> x'
    (start: the decode index of the call's first token); either may be absent. Without a policy the FFNs run
    unchanged (and record a(x) when `record` is set). Use as a context manager.
    """

    def __init__(self, model: nn.Module):
        self.layers = decoder_layers(model)
        self.policy = None
        self.record = False
        self.start = 0
        self.activations: dict[int, torch.Tensor] = {}
        self.handles = []
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.mlp.register_forward_pre_hook(self._input_hook(index)))
            self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._activation_hook(index)))

    def _input_hook(self, index):
        def hook(module, inputs):
            if self.policy is not None and hasattr(self.policy, "ffn_input"):
                return (self.policy.ffn_input(index, inputs[0], self.start),) + tuple(inputs[1:])
            return None

        return hook

    def _activation_hook(self, index):
        def hook(module, inputs):
            activation = inputs[0]
            if self.record:
                self.activations[index] = activation.detach()
            if self.policy is not None and hasattr(self.policy, "activation"):
                return (self.policy.activation(index, activation, self.start),) + tuple(inputs[1:])
            return None

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class StaticMasks:
    """A fixed neuron set per layer and row: masks {layer: bool [R, F]}; layers absent run densely."""

    def __init__(self, masks: dict[int, torch.Tensor]):
        self.masks = masks

    def activation(self, layer: int, activation: torch.Tensor, start: int) -> torch.Tensor:
        mask = self.masks.get(layer)
        return activation if mask is None else activation * mask.unsqueeze(1).to(activation.dtype)


@dataclass
class Prefilled:
    """One prompt after its dense prefill: the context's cache and activations, and the continuation."""

    cache: object
    activations: dict[int, torch.Tensor]  # layer -> [1, T_context, F]
    continuation: torch.Tensor  # [1, T_cont] token ids; the first is predicted by the prefill


@torch.no_grad()
def prefill(model: nn.Module, ffns: MaskedFFNs, context: torch.Tensor, continuation: torch.Tensor) -> Prefilled:
    ffns.policy, ffns.record = None, True
    try:
        output = model(input_ids=context, use_cache=True)
    finally:
        ffns.record = False
    activations, ffns.activations = ffns.activations, {}
    return Prefilled(output.cache, activations, continuation)


def expanded_cache(cache, rows: int):
    """A copy of a batch-1 cache repeated over `rows` rows."""
    cache = copy.deepcopy(cache)
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    return cache


@torch.no_grad()
def continuation_nll(model: nn.Module, ffns: MaskedFFNs, prompt: Prefilled, policy, rows: int) -> torch.Tensor:
    """Summed NLL [rows] of the continuation's tokens 1.. teacher-forced through the decode path (policy)."""
    tokens = prompt.continuation.expand(rows, -1)
    ffns.policy, ffns.start = policy, 0
    try:
        logits = model(input_ids=tokens[:, :-1], cache=expanded_cache(prompt.cache, rows), use_cache=True).logits
    finally:
        ffns.policy = None
    targets = tokens[:, 1:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), reduction="none")
    return nll.view(rows, -1).sum(1)


# ---------------------------------------------------------------------------------------------- calibration


def split_prompts(prompts, tokenizer, continuation_tokens: int, min_context: int = 8):
    """(context [1, Tc], continuation [1, Tn]) pairs from strings (with a tokenizer) or token id sequences."""
    if isinstance(prompts, (str, torch.Tensor)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or token id sequences")
    if not isinstance(continuation_tokens, int) or continuation_tokens < 2:
        raise ValueError(f"continuation_tokens must be an int >= 2, got {continuation_tokens!r}")
    pairs = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("prompts are strings: pass tokenizer= (or a processor) to turn them into tokens")
            tokenizer_call = getattr(tokenizer, "tokenizer", tokenizer)
            ids = torch.as_tensor(tokenizer_call(prompt, add_special_tokens=False)["input_ids"])
        else:
            ids = torch.as_tensor(prompt)
        ids = ids.reshape(-1).long()
        if len(ids) < continuation_tokens + min_context:
            raise ValueError(f"prompts: a prompt has {len(ids)} tokens, fewer than continuation_tokens "
                             f"({continuation_tokens}) + {min_context} of context")
        pairs.append((ids[None, :-continuation_tokens], ids[None, -continuation_tokens:]))
    return pairs


def rule_masks(prompt: Prefilled, layer: int, shares, rule: str, rho: float) -> torch.Tensor:
    """Bool [len(shares), F]: the neurons `rule` keeps at each share, from the prompt's context activations."""
    activations = prompt.activations[layer]
    width = activations.shape[-1]
    order = neuron_rules.ranking(rule, activations, torch.ones(activations.shape[:2], dtype=torch.bool), rho)[0]
    masks = torch.zeros(len(shares), width, dtype=torch.bool)
    for row, share in enumerate(shares):
        masks[row, order[: neuron_rules.neuron_count(width, share)]] = True
    return masks


@torch.no_grad()
def measure_sensitivity(model, prompts: list[Prefilled], ffns: MaskedFFNs, shares, rule: str = "mass",
                        rho: float = 0.2, layers=None, rows_per_call: int = 48) -> tuple[dict, float]:
    """{layer: {share: mean NLL increase per token}} with only that layer sparse, and the dense mean NLL."""
    layers = list(range(len(ffns.layers))) if layers is None else list(layers)
    settings = [(layer, share) for layer in layers for share in shares]
    totals = torch.zeros(len(settings))
    dense_total, token_count = 0.0, 0
    for prompt in prompts:
        dense_total += continuation_nll(model, ffns, prompt, None, 1).item()
        token_count += prompt.continuation.shape[1] - 1
        masks_by_layer = {layer: rule_masks(prompt, layer, shares, rule, rho) for layer in layers}
        for first in range(0, len(settings), rows_per_call):
            chunk = settings[first:first + rows_per_call]
            masks = {}
            for row, (layer, share) in enumerate(chunk):
                if layer not in masks:
                    masks[layer] = torch.ones(len(chunk), masks_by_layer[layer].shape[1], dtype=torch.bool)
                masks[layer][row] = masks_by_layer[layer][shares.index(share)]
            totals[first:first + len(chunk)] += continuation_nll(model, ffns, prompt, StaticMasks(masks), len(chunk))
    dense_nll = dense_total / token_count
    sensitivity: dict[int, dict[float, float]] = {layer: {} for layer in layers}
    for (layer, share), total in zip(settings, totals.tolist()):
        sensitivity[layer][share] = total / token_count - dense_nll
    return sensitivity, dense_nll


def allocate(sensitivity: dict[int, dict[float, float]], num_layers: int, max_units: int | None = None,
             max_increase: float | None = None) -> dict[int, float]:
    """Per-layer shares from additive sensitivities (a multiple-choice knapsack, exact on the grid).

    Each layer takes a share of its grid or 1 (dense, cost 0). Sensitivities are made non-negative and
    non-increasing in the share first (noise aside, fewer neurons never help). With max_units (the sum of
    shares, in units of SHARE_STEP) it returns the allocation of least summed sensitivity within it; with
    max_increase, the allocation of fewest units whose summed sensitivity is within it. Layers absent from
    `sensitivity` stay dense. Returns {layer: share} for the layers below 1.
    """
    full = round(1 / SHARE_STEP)
    options = []  # per layer: (units, cost, share)
    for layer in range(num_layers):
        row = sensitivity.get(layer, {})
        choices, worst = [(full, 0.0, 1.0)], 0.0
        for share in sorted(row, reverse=True):
            worst = max(worst, row[share], 0.0)
            choices.append((round(share / SHARE_STEP), worst, share))
        options.append(choices)
    total_units = full * num_layers
    infinity = float("inf")
    best = [0.0] + [infinity] * total_units  # best[u]: least cost using exactly u units so far
    picks = []
    for choices in options:
        new, pick = [infinity] * (total_units + 1), [None] * (total_units + 1)
        for used, cost in enumerate(best):
            if cost == infinity:
                continue
            for units, extra, share in choices:
                if cost + extra < new[used + units]:
                    new[used + units], pick[used + units] = cost + extra, (used, share)
        best, picks = new, picks + [pick]
    if max_units is not None:
        candidates = [u for u in range(min(max_units, total_units) + 1) if best[u] < infinity]
        if not candidates:
            raise ValueError(f"no allocation fits in {max_units} units")
        target = min(candidates, key=lambda u: (best[u], u))
    elif max_increase is not None:
        target = min((u for u in range(total_units + 1) if best[u] <= max_increase), default=total_units)
    else:
        raise ValueError("allocate needs max_units or max_increase")
    shares, used = {}, target
    for layer in reversed(range(num_layers)):
        used, share = picks[layer][used]
        if share < 1:
            shares[layer] = share
    return dict(sorted(shares.items()))


def flops_saved(budgets: dict[int, float], num_layers: int) -> float:
    """Share of decode FFN FLOPs saved when each layer computes its share of neurons (equal FFN widths)."""
    return sum(1 - share for share in budgets.values()) / num_layers


def budget_masks(prompt: Prefilled, budgets: dict[int, float], rule: str, rho: float) -> dict[int, torch.Tensor]:
    return {layer: rule_masks(prompt, layer, [share], rule, rho) for layer, share in budgets.items()}


@torch.no_grad()
def measured_increase(model, prompts: list[Prefilled], ffns: MaskedFFNs, budgets: dict[int, float], rule: str,
                      rho: float, dense_nll: float) -> float:
    """Relative perplexity increase on the prompts when every layer decodes with its budget."""
    total, count = 0.0, 0
    for prompt in prompts:
        policy = StaticMasks(budget_masks(prompt, budgets, rule, rho))
        total += continuation_nll(model, ffns, prompt, policy, 1).item()
        count += prompt.continuation.shape[1] - 1
    return math.exp(total / count - dense_nll) - 1


def cache_path(model_hash: str, settings: dict) -> Path:
    root = Path(os.environ.get("CM_CACHE") or Path.home() / ".cache" / "corematching")
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return root / "calibration" / f"{model_hash}-{key}.json"


def calibrate(model: nn.Module, prompts, tolerance: float = 0.1, *, tokenizer=None, rule: str = "mass",
              rho: float = 0.2, shares=DEFAULT_SHARES, continuation_tokens: int = 32, layers=None,
              attempts: int = 6, use_cache: bool = True) -> Calibration:
    """Per-layer neuron budgets that save the most decode FFN FLOPs within a perplexity tolerance.

    model: a causal LM with gated FFNs (Llama, Gemma 3, ...) or a LLaVA-style VLM (its language model is
    calibrated on text). prompts: strings (with tokenizer=, a tokenizer or processor) or token id sequences;
    the last `continuation_tokens` of each are the held-out continuation, the rest the context. tolerance:
    the allowed relative increase of the continuation perplexity on these prompts (0.1 = 10%). rule: the
    neuron rule of the method that will use the budgets. layers: the layers that may be sparse (default all).
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}")
    if rule not in neuron_rules.RULES:
        raise ValueError(f"rule must be one of {neuron_rules.RULES}, got {rule!r}")
    shares = tuple(float(share) for share in shares)
    if not shares or any(not 0 < s < 1 or abs(s / SHARE_STEP - round(s / SHARE_STEP)) > 1e-9 for s in shares):
        raise ValueError(f"shares must be multiples of {SHARE_STEP} in (0, 1), got {shares!r}")
    pairs = split_prompts(prompts, tokenizer, continuation_tokens)
    was_training = model.training
    model.eval()
    with MaskedFFNs(model) as ffns:
        num_layers = len(ffns.layers)
        if layers is not None and any(not 0 <= int(layer) < num_layers for layer in layers):
            raise ValueError(f"layers must be in 0..{num_layers - 1}, got {list(layers)!r}")
        model_hash = fingerprint(model)
        settings = {"prompts": [torch.cat(pair, 1).tolist() for pair in pairs], "tolerance": float(tolerance),
                    "rule": rule, "rho": rho, "shares": shares, "layers": layers, "version": FORMAT_VERSION}
        path = cache_path(model_hash, settings)
        if use_cache and path.exists():
            return Calibration.load(path)
        try:
            prefilled = [prefill(model, ffns, context, continuation) for context, continuation in pairs]
            sensitivity, dense_nll = measure_sensitivity(model, prefilled, ffns, list(shares), rule, rho, layers)
            allowance = math.log1p(tolerance)
            budgets, increase = {}, 0.0
            for _ in range(attempts):
                candidate = allocate(sensitivity, num_layers, max_increase=allowance)
                measured = measured_increase(model, prefilled, ffns, candidate, rule, rho, dense_nll)
                if measured <= tolerance:
                    budgets, increase = candidate, measured
                    break
                allowance /= 2
        finally:
            model.train(was_training)
    result = Calibration(budgets=budgets, rule=rule, tolerance=float(tolerance),
                         flops_saved=flops_saved(budgets, num_layers), perplexity_increase=increase,
                         model=model_hash, num_layers=num_layers, sensitivity=sensitivity)
    if use_cache:
        result.save(path)
    return result
