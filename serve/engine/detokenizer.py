"""Token ids to text, incrementally, and stop strings: what a stream may show and when.

Decoding each new token alone is wrong (byte-level BPE splits multi-byte characters over
tokens; sentencepiece drops a token's leading space), and decoding everything every step is
quadratic. So, as vLLM does, each step decodes only a short window: the text of
ids[prefix:] minus the text of ids[prefix:read] is the new text, and while it ends in an
incomplete character (U+FFFD) nothing is released. The window starts on the prompt's last
tokens so the first generated token decodes in context.

A stream must also never show text that a stop string later removes, so the tail of the
text that could still be the start of a stop string is held back until it is resolved.
"""

from __future__ import annotations

PROMPT_CONTEXT = 5  # prompt tokens decoded as context in front of the first generated one


class Detokenizer:
    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop  # a matched stop string stays in the text (vLLM's include_stop_str_in_output)
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT:]) if tokenizer is not None else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # generated text so far (a matched stop string and what follows removed)
        self.sent = 0  # characters of text already handed out as deltas

    def add(self, token_id: int, check_stop: bool = True) -> bool:
        """Append a generated token's text; True when a stop string now occurs (text cut before
        it, or after it with include_stop). `check_stop` False: not yet (min_tokens)."""
        if self.tokenizer is None:
            return False
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens)
        after = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False  # an incomplete character: wait for the next token
        new = after[len(before) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += new
        if not check_stop:
            return False
        for stop in self.stop:
            at = self.text.find(stop, start)
            if at >= 0:
                self.text = self.text[: at + len(stop) if self.include_stop else at]
                return True
        return False

    def delta(self, final: bool) -> str:
        """Text not yet handed out; while running, minus a tail that may begin a stop string."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out

    def _held_back(self) -> int:
        held = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:k]):
                    held = k
                    break
        return held
