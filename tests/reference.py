"""Independent references for the tests: naive per-token selection in plain Python, and a forward pass that
calls the decoder layers' parts directly (no hooks, no runtime code)."""

import math
from fractions import Fraction

import torch

# ---------------------------------------------------------------------------------------------- selection


def exact_ceil(ratio: float, count: int) -> int:
    return math.ceil(Fraction(ratio).limit_denominator(10**6) * count)


def naive_token_core(values: list[float], rho: float) -> set[int]:
    positive = [n for n, v in enumerate(values) if v > 0]
    k = exact_ceil(rho, len(positive))
    ranked = sorted(positive, key=lambda n: (-values[n], n))
    return set(ranked[:k])


def naive_sentence_core(activations: torch.Tensor, tokens: list[int], rho: float, beta: float) -> list[int]:
    """activations [T, F] of one sample; tokens: the token set S."""
    width = activations.shape[1]
    rows = [activations[t].tolist() for t in tokens]
    cores = [naive_token_core(row, rho) for row in rows]
    frequency = [sum(n in core for core in cores) for n in range(width)]
    sums = [sum(row[n] for row in rows) for n in range(width)]
    ranked = sorted(range(width), key=lambda n: (-frequency[n], -sums[n], n))
    return sorted(ranked[: exact_ceil(beta, width)])


def naive_core_matching_keep(
    activations: torch.Tensor, visual: list[int], match: list[int], rho: float, beta: float, budget
) -> list[int]:
    """Kept visual positions of one sample with one image: activations [T, F] at the prune layer."""
    core = set(naive_sentence_core(activations, match, rho, beta))
    scores = {v: len(naive_token_core(activations[v].tolist(), rho) & core) for v in visual}
    ranked = sorted(visual, key=lambda v: (-scores[v], v))
    if budget is None:
        return sorted(ranked[: naive_elbow_count([scores[v] for v in ranked])])
    m = budget if isinstance(budget, int) else exact_ceil(budget, len(visual))
    return sorted(ranked[:m])


def naive_elbow_count(sorted_scores: list[float], min_tokens: int = 1) -> int:
    n = len(sorted_scores)
    high, low = sorted_scores[0], sorted_scores[-1]
    if n <= 1 or high == low:
        return n
    best, best_distance = 0, -1.0
    for i, s in enumerate(sorted_scores):
        distance = abs(i / (n - 1) + (s - low) / (high - low) - 1)
        if distance > best_distance:
            best, best_distance = i, distance
    threshold = sorted_scores[best]
    return max(sum(s >= threshold for s in sorted_scores), min(min_tokens, n))


# ---------------------------------------------------------------------------------------------- forward


def image_embeddings(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The language model's input embeddings [1, T, H] with the image features placed at the image tokens."""
    llava = model.model
    embeds = llava.language_model.embed_tokens(input_ids)
    features = torch.cat(list(llava.get_image_features(pixel_values=pixel_values).pooler_output), dim=0)
    embeds = embeds.clone()
    embeds[input_ids == model.config.image_token_id] = features
    return embeds


def causal_float_mask(length: int, dtype=torch.float32) -> torch.Tensor:
    blocked = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return blocked.view(1, 1, length, length)


def run_layer(layer, hidden, position_ids, rotary, zero_neurons=None, new_tokens=0):
    """One decoder layer from its parts. zero_neurons: activation indices kept for the last `new_tokens`
    tokens (all others zeroed there), or None for a dense FFN."""
    length = hidden.shape[1]
    cos, sin = rotary(hidden, position_ids)
    residual = hidden
    attended, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden),
        attention_mask=causal_float_mask(length, hidden.dtype),
        position_embeddings=(cos, sin),
        position_ids=position_ids,
    )
    hidden = residual + attended
    normed = layer.post_attention_layernorm(hidden)
    mlp = layer.mlp
    activation = mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed)
    if zero_neurons is not None and new_tokens > 0:
        keep = torch.zeros(activation.shape[-1], dtype=torch.bool)
        keep[zero_neurons] = True
        activation = activation.clone()
        activation[:, -new_tokens:, ~keep] = 0
    return hidden + mlp.down_proj(activation), activation


@torch.no_grad()
def reference_run(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    prune_layer: int | None = None,
    kept_prompt_positions: torch.Tensor | None = None,
    prompt_length: int | None = None,
    core_neurons: dict | None = None,
):
    """Last-token logits [V] of one sample, and the FFN activations of every layer.

    Layers 0..K see the whole sequence; layers K+1.. see the kept prompt positions plus every token after the
    prompt, with their original position ids. Tokens after the prompt use an FFN whose activation is zeroed
    outside core_neurons[layer] (for the layers in core_neurons).
    """
    language_model = model.model.language_model
    hidden = image_embeddings(model, input_ids, pixel_values)
    length = input_ids.shape[1]
    position_ids = torch.arange(length).unsqueeze(0)
    prompt_length = length if prompt_length is None else prompt_length
    new_tokens = length - prompt_length
    core_neurons = core_neurons or {}
    activations = {}
    for index, layer in enumerate(language_model.layers):
        if prune_layer is not None and index == prune_layer + 1:
            gathered = torch.cat([kept_prompt_positions, torch.arange(prompt_length, length)])
            hidden = hidden[:, gathered]
            position_ids = position_ids[:, gathered]
        hidden, activations[index] = run_layer(
            layer, hidden, position_ids, language_model.rotary_emb, core_neurons.get(index), new_tokens
        )
    logits = model.lm_head(language_model.norm(hidden))
    return logits[0, -1], activations


@torch.no_grad()
def dense_activations(model, inputs: dict) -> dict[int, torch.Tensor]:
    """The FFN activations [B, T, F] of every layer in a plain dense forward (captured at down_proj's input)."""
    captured, handles = {}, []
    for index, layer in enumerate(model.model.language_model.layers):

        def grab(module, args, index=index):
            captured[index] = args[0].detach().clone()

        handles.append(layer.mlp.down_proj.register_forward_pre_hook(grab))
    try:
        model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured
