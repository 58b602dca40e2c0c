"""Assisted decoding's first call: generate() runs the prompt and the first candidates (the assistant's or prompt
lookup's proposals) through the model in one call. Greedy search prefills the prompt alone and decodes what
follows, so the engine must know which tokens of that call are candidates: they take no part in the decisions,
always go on past the prune layer, and compute the FFNs as decode steps do (engine.py).

generate() hands the prompt to `_get_candidate_generator` before the first call; the session wraps that method of
the model (for the session's lifetime) so that the prompt is known here. The note is per thread: generate() notes
and uses it in its own thread, and another thread's generate() never takes it.
"""

import threading

import torch


class AssistedPrompt(threading.local):
    def __init__(self):
        self.prompt: torch.Tensor | None = None  # [B, T] ids of an assisted generate()'s prompt, until its first call

    def watch(self, get_candidate_generator):
        """A stand-in for the model's `_get_candidate_generator` that notes the prompt it is called with."""

        def wrapper(*args, **kwargs):
            input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[1] if len(args) > 1 else None
            has_prompt = isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] > 0
            self.prompt = input_ids if has_prompt else None
            return get_candidate_generator(*args, **kwargs)

        return wrapper

    def candidates(self, input_ids: torch.Tensor | None) -> torch.Tensor | None:
        """For a fresh call's input_ids [B, q]: bool [B, q], the candidates after the noted prompt when the call is
        that prompt followed by candidates; None for any other call. The note is used once; a call that is not
        the prompt drops it, the prompt alone (the assistant's own prefill, when it is the same model) keeps it."""
        prompt = self.prompt
        if prompt is None:
            return None
        length = prompt.shape[1]
        same_start = (
            input_ids is not None
            and input_ids.shape[0] == prompt.shape[0]
            and input_ids.shape[1] >= length
            and torch.equal(input_ids[:, :length], prompt.to(input_ids.device))
        )
        if same_start and input_ids.shape[1] == length:
            return None
        self.prompt = None
        if not same_start:
            return None
        return (torch.arange(input_ids.shape[1], device=input_ids.device) >= length).expand_as(input_ids)
