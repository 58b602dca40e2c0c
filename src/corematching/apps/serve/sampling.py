"""Per-request token choice inside a batch: greedy, or sampled from the request's own seeded generator.

Batch invariance with sampling: each request draws from its own `torch.Generator`, seeded by its `seed` (or by
a fresh random seed when it gives none), and only from its own row of logits. So the tokens a seeded request
samples do not depend on its batch mates (up to float ties, as for greedy decoding): the same seed gives the
same answer alone or batched.
"""

from __future__ import annotations

import secrets
import time

import torch


class RequestSampler:
    """Chooses one request's next token from its row of logits."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature = temperature
        self.top_p = top_p
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(seed % 2**63 if seed is not None else secrets.randbits(63))

    def choose(self, logits: torch.Tensor) -> int:
        """logits [V] (float) -> token id."""
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
            sorted_probs[before >= self.top_p] = 0.0  # keep the smallest prefix whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class BatchChooser:
    """A transformers LogitsProcessor: every row's next token is chosen by that row's sampler, and the row's
    scores become 0 at that token and -inf elsewhere, so generate's greedy step picks exactly it.

    It is called once per step, right after each forward pass: the first call marks the end of the prefill.
    """

    def __init__(self, samplers: list[RequestSampler], on_prefill_done=None):
        self.samplers = samplers
        self.on_prefill_done = on_prefill_done
        self.prefill_done_at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prefill_done_at is None:
            self.prefill_done_at = time.perf_counter()
            if self.on_prefill_done is not None:
                self.on_prefill_done(scores)
        chosen = torch.tensor([sampler.choose(row) for sampler, row in zip(self.samplers, scores)],
                              device=scores.device)
        return one_hot_scores(scores, chosen)


def one_hot_scores(scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(scores, float("-inf"))
    out.scatter_(1, chosen.view(-1, 1), 0.0)
    return out
