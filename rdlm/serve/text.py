"""Streamed text: each new token's text delta, stop strings found across token boundaries, and nothing
sent that a stop string may yet cut away."""

from __future__ import annotations

from rdlm.tokenizer import Tokenizer

CONTEXT_IDS = 4  # prompt ids decoded before the answer: a first piece's leading space survives decoding


class TextStream:
    """The answer's text as tokens arrive. Text is what the ids decode to after the prompt's last ids (so a
    sentencepiece word keeps its space); a delta is held back while it ends in an incomplete character or
    in the start of a stop string."""

    def __init__(self, tok: Tokenizer, prompt: list[int], stop: tuple[str, ...] = ()):
        self.tok, self.stop = tok, tuple(s for s in stop if s)
        self.context = list(prompt[-CONTEXT_IDS:])
        self.prefix = tok.decode(self.context)
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already sent
        self.text = ""

    def _decode(self) -> str:
        full = self.tok.decode(self.context + self.ids)
        return full[len(self.prefix):] if full.startswith(self.prefix) else self.tok.decode(self.ids)

    def push(self, token: int) -> tuple[str, bool]:
        """(text to send now, a stop string was reached: the text ends before it)."""
        self.ids.append(token)
        self.text = self._decode()
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._take(len(self.text)), True
        safe = len(self.text)
        if self.text.endswith("\ufffd"):  # a character whose bytes are split over tokens
            safe = len(self.text.rstrip("\ufffd"))
        for s in self.stop:  # the longest tail that begins a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        return self._take(max(safe, self.sent)), False

    def _take(self, upto: int) -> str:
        delta, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return delta

    def flush(self) -> str:
        """What was held back, at the end of the answer."""
        return self._take(len(self.text))
