"""Model resolution: directories pass through, the default GGUF is dequantized once into a
cache that plain transformers loads, and a failed conversion leaves no cache behind."""

from __future__ import annotations

import json
import os

import pytest

from serve.weights import _cache_dir, gguf_to_dir, model_name, resolve_model


def test_directories_and_config_paths_pass_through(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model(str(tmp_path / "config.json")) == tmp_path
    assert model_name(tmp_path) == tmp_path.name
    with pytest.raises(ValueError, match="not a transformers directory"):
        resolve_model(str(tmp_path / "missing"))


def test_default_model_is_a_cached_plain_transformers_directory():
    pytest.importorskip("gguf")
    from transformers import AutoConfig

    path = resolve_model(None)
    assert resolve_model("smollm2") == path
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(os.listdir(path))
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    cfg = AutoConfig.from_pretrained(path)  # what vLLM or transformers will read
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192
    assert model_name(path) == "SmolLM2-135M-Instruct"


def test_cache_key_follows_the_content_and_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISTACK_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file" * 1000)
    key = _cache_dir(bad)
    os.utime(bad, ns=(1, 1))
    (tmp_path / "elsewhere").mkdir()
    copy = tmp_path / "elsewhere" / "broken.gguf"
    copy.write_bytes(bad.read_bytes())
    assert _cache_dir(bad) == _cache_dir(copy) == key  # a reinstall (new path, new mtime) reuses the cache
    bad.write_bytes(b"not a gguf file" * 999 + b"NOT A GGUF FILE")
    assert _cache_dir(bad) != key  # new content, new key
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_to_dir(bad)
    assert list((tmp_path / "cache" / "models").iterdir()) == []
