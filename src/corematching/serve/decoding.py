"""Following each request of a batch as tokens come: its text so far, stop sequences, its own token limit, a
client that went away. A transformers StoppingCriteria that answers, per row, whether the row is finished."""

from __future__ import annotations

import time

import torch


class RequestText:
    """One request's generated tokens and the text it has been sent so far."""

    def __init__(self, tokenizer, max_tokens: int, stop: list[str], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.stop = stop
        self.eos_ids = eos_ids
        self.tokens: list[int] = []
        self.text = ""  # final text (stop sequence cut off)
        self.sent = 0  # characters of the text already handed to the client
        self.finish_reason: str | None = None
        self.finished_at: float | None = None

    def add(self, token: int) -> str:
        """Take one generated token; return the new text that can be sent now (maybe empty)."""
        if self.finish_reason is not None:
            return ""
        if token in self.eos_ids:
            return self._finish("stop", self.text)
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.stop:
            cut = text.find(stop)
            if cut >= 0:
                return self._finish("stop", text[:cut])
        self.text = text
        if len(self.tokens) >= self.max_tokens:
            return self._finish("length", text)
        # Hold back an unfinished character and anything that may be the start of a stop sequence.
        ready = len(text.rstrip("\ufffd"))
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    ready = min(ready, len(text) - size)
                    break
        return self._take(ready)

    def end_at_limit(self) -> str:
        """Generation stopped without this request finishing on its own: it ends at its length limit."""
        return self._finish("length", self.text) if self.finish_reason is None else ""

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            self.finished_at = time.perf_counter()

    def _finish(self, reason: str, text: str) -> str:
        self.finish_reason = reason
        self.finished_at = time.perf_counter()
        self.text = text
        return self._take(len(text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self.text[self.sent : upto]
        self.sent = upto
        return piece


class BatchFollower:
    """A transformers StoppingCriteria over a batch: feeds each row's newest token to its RequestText, passes
    new text to `on_text(row, text)`, and marks rows done (finished, or `is_cancelled(row)`)."""

    def __init__(self, texts: list[RequestText], on_text, is_cancelled):
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
