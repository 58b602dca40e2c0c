"""One request's generated tokens and text, grown incrementally: stop sequences, end tokens, its token limit, and
the text that can be streamed now (an unfinished character or the possible start of a stop sequence held back)."""

from __future__ import annotations

import time


class StreamText:
    """One request's generated tokens and text, grown incrementally.

    Each new token decodes only a short window (the tokens since the last complete character boundary and the
    ones before it, for the spacing rules of the tokenizer), so a step costs the same at token 5 and token 500.
    Stop sequences are searched in the new text and the few characters before it; text that may be the start of
    a stop sequence, or an unfinished character, is held back from the stream until it is settled."""

    def __init__(self, tokenizer, max_tokens: int, stop: list[str], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.eos_ids = eos_ids
        self.tokens: list[int] = []
        self.text = ""  # settled text so far (the final text once finished, a stop sequence cut off)
        self.sent = 0  # characters of the text already handed out
        self.finish_reason: str | None = None
        self.finished_at: float | None = None
        self._window = 0  # first token of the decoded window
        self._settled = 0  # tokens whose text is in self.text
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Take one generated token; return the new text that can be sent now (maybe empty)."""
        if self.finish_reason is not None:
            return ""
        if token in self.eos_ids:
            return self._finish("stop", self.text + self._pending())
        self.tokens.append(token)
        before = self._decode(self._window, self._settled)
        now = self._decode(self._window, len(self.tokens))
        if len(now) > len(before) and not now.endswith("\ufffd"):
            searched_from = max(0, len(self.text) - self._longest_stop + 1)
            self.text += now[len(before):]
            self._window, self._settled = self._settled, len(self.tokens)
            cut = self._first_stop(searched_from)
            if cut is not None:
                return self._finish("stop", self.text[:cut])
        if len(self.tokens) >= self.max_tokens:
            return self._finish("length", self.text + self._pending())
        ready = len(self.text)
        for stop in self.stop:  # hold back what may be the start of a stop sequence
            for size in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:size]):
                    ready = min(ready, len(self.text) - size)
                    break
        return self._take(ready)

    def end_at_limit(self) -> str:
        """Decoding stopped without this request finishing on its own: it ends at its length limit."""
        return self._finish("length", self.text + self._pending()) if self.finish_reason is None else ""

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            self.finished_at = time.perf_counter()

    def _decode(self, start: int, end: int) -> str:
        if end <= start:
            return ""
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True)

    def _pending(self) -> str:
        """Text of the tokens not settled yet (an unfinished character)."""
        if self._settled == len(self.tokens):
            return ""
        return self._decode(self._window, len(self.tokens))[len(self._decode(self._window, self._settled)):]

    def _first_stop(self, start: int) -> int | None:
        cuts = [cut for cut in (self.text.find(stop, start) for stop in self.stop) if cut >= 0]
        return min(cuts) if cuts else None

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
