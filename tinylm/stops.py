"""Decoded text released as it becomes final, cut at stop strings (serve and `generate --stop`).

Stop strings are matched on the decoded text, so they may span tokens: the text is cut before
the match, and `stopped` tells the caller to stop decoding. Text that could still turn into a
stop string (or a half-decoded UTF-8 character) is held back until it is certain, so a stream
never shows what a stop string later removes.
"""

from __future__ import annotations

from tinylm.tokenizer.base import Tokenizer


class TextStream:
    """Decoded text of one choice, released as it becomes final (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], prefix: str = "") -> None:
        self.tokenizer, self.stops, self.prefix = tokenizer, stops, prefix
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def push(self, token: int) -> str:
        """Add an id; return the newly final text (sets `stopped` on a stop sequence)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self._release(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))  # a multi-byte character still incomplete
        for stop in self.stops:  # hold back a tail that may become a stop sequence
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if self.text[safe - k : safe] == stop[:k]:
                    safe -= k
                    break
        return self._release(max(safe, self.sent))

    def flush(self) -> str:
        """The rest of the text (the request ended, so nothing more can complete a stop)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.sent : upto]
        if self.sent == 0 and self.prefix:
            out, self.prefix = self.prefix + out, ""
        self.sent = max(self.sent, upto)
        return out
