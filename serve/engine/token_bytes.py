"""Each token's own bytes, for logprobs. Decoding one token alone gives U+FFFD for a token that
holds only part of a UTF-8 character (byte-level BPE splits an emoji or a rare CJK character
over two or three tokens), and reporting the bytes of U+FFFD would make the joined `bytes` of a
response differ from its text. The bytes come from the vocabulary instead: byte-level BPE (GPT-2,
Llama 3, SmolLM2) maps every byte to one printable character, inverted here; sentencepiece writes
`<0xNN>` for a byte and `▁` for a space; added tokens are their text. A token whose bytes are not
whole UTF-8 is named by them, escaped ("\\xf0\\x9f"), as OpenAI's API names such tokens.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

SENTENCEPIECE_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable character -> the byte it stands for."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class TokenBytes:
    """token id -> its bytes and its display text, cached per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = (json.loads(backend.to_str()).get("decoder") or {}) if backend is not None else {}
        if decoder.get("type") == "ByteLevel":
            self.scheme = "byte_level"
        elif any(k in json.dumps(decoder) for k in ('"ByteFallback"', '"Metaspace"')):
            self.scheme = "sentencepiece"
        else:  # WordPiece and the rest: the token decoded alone (right for whole characters)
            self.scheme = "decode"
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        """The token's bytes as they appear in the decoded text (a leading-space marker as a space)."""
        if token_id not in self._cache:
            self._cache[token_id] = self._bytes(token_id)
        return self._cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode()
        if self.scheme == "decode":
            return self.tokenizer.decode([token_id]).encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.scheme == "byte_level":
            table = _byte_level_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode()
        if match := SENTENCEPIECE_BYTE.match(piece):
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def text(self, token_id: int) -> str:
        """The token's text; escaped bytes when they are not whole UTF-8 characters."""
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"\\x{b:02x}" for b in raw)
