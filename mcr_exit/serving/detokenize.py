"""Incremental detokenization with stop strings: text grows by a short decode per token, not a full one.

Each new token decodes only a window that starts at the previous piece (so tokenizers that drop a
leading space at the start of a decode agree with a full decode); text that could still become a stop
string, and half-decoded UTF-8, is held back from the stream until it is settled.
"""

from __future__ import annotations


class TextTracker:
    """Token ids -> text for one generated sequence; ``add`` returns whether the sequence has finished."""

    def __init__(self, tokenizer, *, eos_ids: set[int], max_tokens: int, stop: tuple[str, ...] = ()):
        self.tok, self.eos_ids, self.max_tokens = tokenizer, eos_ids, max_tokens
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of text already handed to the stream
        self.done = False
        self.finish_reason = "length"
        self._prefix = 0  # decode window: ids[_prefix:_read] is the last decoded piece
        self._read = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> bool:
        if self.done:
            return True
        if token in self.eos_ids:
            self._finish("stop")
            return True
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            if self.stop:
                lo = max(0, start - self._hold)
                cut = min((i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0), default=-1)
                if cut >= 0:
                    self.text, self.done, self.finish_reason = self.text[:cut], True, "stop"
                    return True
        if len(self.ids) >= self.max_tokens:
            self._finish("length")
        return self.done

    def _finish(self, reason: str) -> None:
        self.done, self.finish_reason = True, reason
        if self._read < len(self.ids):  # a trailing partial character: keep what a full decode shows
            tail = self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self.text += tail

    def abort(self) -> None:
        self.done, self.finish_reason = True, "abort"

    def pending_text(self) -> str:
        """New text that can be streamed now (all of it once done); advances the emitted mark."""
        end = len(self.text) if self.done else max(self.emitted, len(self.text) - self._hold)
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece
