"""Following each request of a batch as tokens come: its text so far, stop sequences, its own token limit, a
client that went away. A transformers StoppingCriteria that answers, per row, whether the row is finished."""

from __future__ import annotations

import torch

from .stream_text import StreamText


class BatchFollower:
    """A transformers StoppingCriteria over a batch: feeds each row's newest token to its StreamText, passes
    new text to `on_text(row, text)`, and marks rows done (finished, or `is_cancelled(row)`)."""

    def __init__(self, texts: list[StreamText], on_text, is_cancelled):
        self.texts = texts
        self.on_text = on_text
        self.is_cancelled = is_cancelled

    def feed(self, row: int, token: int) -> None:
        text = self.texts[row]
        if text.finish_reason is not None:
            return
        if self.is_cancelled(row):
            text.cancel()
            return
        piece = text.add(token)
        if piece:
            self.on_text(row, piece)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        newest = input_ids[:, -1].tolist()
        for row, token in enumerate(newest):
            self.feed(row, token)
        return torch.tensor([t.finish_reason is not None for t in self.texts], device=input_ids.device)
