"""Each token's own bytes (serve/engine/token_bytes.py): joined, they are the text's UTF-8, for
byte-level BPE (the shipped SmolLM2), sentencepiece with byte fallback, and WordPiece."""

from __future__ import annotations

import pytest

from serve.engine.token_bytes import TokenBytes
from serve.weights import resolve_model

TEXTS = ["🎉🥳 party", "混合 text, héllo", "plain ascii", "🇫🇷 \u200d 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_tokens_join_to_the_texts_bytes(text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    tokens = TokenBytes(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokens.scheme == "byte_level"
    assert b"".join(tokens.bytes(i) for i in ids) == text.encode()
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    for i in partial:  # a split character: its token is named by the escaped bytes, never U+FFFD
        assert tokens.text(i).startswith("\\x") and b"\xef\xbf\xbd" not in tokens.bytes(i)
    assert bool(partial) == any(ord(c) > 0x7FF for c in text)
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokens.bytes(special) == b"<|im_start|>"


def test_sentencepiece_byte_fallback():
    """A sentencepiece-style vocabulary (▁ for a space, <0xNN> for bytes it has no piece for)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁hi": 257, "▁": 258, "h": 259, "i": 260}
    backend = Tokenizer(models.BPE(vocab, [], byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokens = TokenBytes(tokenizer)
    ids = tokenizer.encode("hi 🎉", add_special_tokens=False)
    assert tokens.scheme == "sentencepiece"
    assert b"".join(tokens.bytes(i) for i in ids) == " hi 🎉".encode()  # sentencepiece's leading space included
    assert [tokens.text(i) for i in ids[-4:]] == ["\\xf0", "\\x9f", "\\x8e", "\\x89"]


def test_wordpiece_falls_back_to_decoding():
    from transformers import AutoTokenizer

    from profiling.shipped import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokens = TokenBytes(tokenizer)
    (i,) = tokenizer.encode("hello", add_special_tokens=False)
    assert tokens.scheme == "decode" and tokens.bytes(i) == b"hello"
