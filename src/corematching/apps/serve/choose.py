"""Choosing every running row's next token on the device: greedy, or sampled with the row's temperature and top-p
(as tensors) from the row's own seeded generator, so a row's tokens do not depend on its batch mates."""

from __future__ import annotations

import torch


def new_generator(seed: int, device) -> torch.Generator:
    """A request's own sampling generator, on the device its logits live on."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed % 2**63)
    return generator


def choose_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generators: list
) -> torch.Tensor:
    """The next token of every row, on the device: logits [B, V]; temperature [B] (0: greedy); top_p [B] in
    (0, 1]; generators: per row its torch.Generator (None for a greedy row).

    A sampled row draws one uniform number from its own generator and inverts the cumulative distribution of its
    own top-p-truncated softmax, so its token does not depend on its batch mates: the same seed gives the same
    tokens alone or batched. Nothing is copied to the host."""
    greedy = logits.argmax(-1)
    sampled_rows = [row for row, generator in enumerate(generators) if generator is not None]
    if not sampled_rows:
        return greedy
    device = logits.device
    draws = torch.stack([torch.rand((), generator=generators[row], device=device) for row in sampled_rows])
    uniform = torch.zeros(logits.shape[0], device=device)
    uniform[torch.tensor(sampled_rows, device=device)] = draws
    scaled = logits.float() / temperature.to(device).clamp(min=1e-6).unsqueeze(1)
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = sorted_probs.masked_fill(before >= top_p.to(device).unsqueeze(1), 0.0)  # the top-p prefix
    cumulative = sorted_probs.cumsum(-1)
    target = (uniform * cumulative[:, -1]).unsqueeze(1)
    pick = torch.searchsorted(cumulative, target, right=True).clamp(max=logits.shape[1] - 1)
    sampled = order.gather(1, pick).squeeze(1)
    return torch.where(temperature.to(device) > 0, sampled, greedy)
