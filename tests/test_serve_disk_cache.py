"""The prefix cache's disk tier (serve/engine/disk_cache.py): blocks written through, loaded
after a restart, verified (corrupt and foreign files ignored, counted, deleted), size-capped."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from serve.async_engine import AsyncEngine
from serve.engine import SamplingParams
from serve.engine.disk_cache import DiskCache
from serve.config import EngineConfig
from serve.engine.llm_engine import LLMEngine
from test_serve_api import LiveServer, smollm2, tiny_model  # noqa: F401  (fixtures)
from test_serve_model import make_engine

PROMPT = [(7 * i) % 290 + 3 for i in range(300)]  # 18 full blocks can be hits (one token is always computed)
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def engine_with_disk(tiny_llama, tmp_path, **config):
    """A fresh engine (nothing in memory) over the same model directory and disk tier."""
    return make_engine(tiny_llama, tmp_path / "model", kv_cache_disk=str(tmp_path / "disk"), **config)


def first_run(tiny_llama, tmp_path):
    engine = engine_with_disk(tiny_llama, tmp_path)
    out = engine.generate([PROMPT], PARAMS)[0]
    engine.disk.cache.flush()
    return engine, out


def test_a_restarted_engine_loads_the_prefix_from_disk_and_answers_the_same(tiny_llama, tmp_path):
    first, cold = first_run(tiny_llama, tmp_path)
    assert cold.metrics.cached_prompt_tokens == 0 and len(list((tmp_path / "disk").glob("*.safetensors"))) >= 18
    again = engine_with_disk(tiny_llama, tmp_path)
    warm = again.generate([PROMPT], PARAMS)[0]
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert warm.metrics.cached_prompt_tokens == warm.metrics.disk_cached_prompt_tokens == 18 * 16
    assert again.stats().disk_hit_tokens == 18 * 16 and again.stats().disk_rejected_files == 0
    # a prompt that shares only the first 100 tokens loads only those blocks
    other = again.generate([PROMPT[:100] + [5] * 50], PARAMS)[0]
    assert other.metrics.cached_prompt_tokens == 96


@pytest.mark.parametrize("damage", ["flipped bytes", "another model", "truncated"])
def test_a_damaged_or_foreign_file_is_ignored_counted_and_replaced(tiny_llama, tmp_path, damage):
    first, cold = first_run(tiny_llama, tmp_path)
    keys = []
    first.disk.cache.extend_keys(keys, PROMPT, 18)
    victim = tmp_path / "disk" / f"{keys[4]}.safetensors"  # the fifth block
    if damage == "flipped bytes":
        data = bytearray(victim.read_bytes())
        data[-100] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "another model":
        with safe_open(str(victim), framework="pt") as f:
            meta = dict(f.metadata())
        meta["fingerprint"] = json.dumps({"model": "someone-else"})
        save_file(load_file(str(victim)), str(victim), metadata=meta)
    else:
        victim.write_bytes(victim.read_bytes()[:200])
    again = engine_with_disk(tiny_llama, tmp_path)
    warm = again.generate([PROMPT], PARAMS)[0]
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids  # the rest is prefilled, nothing wrong is served
    assert warm.metrics.disk_cached_prompt_tokens == 4 * 16 and again.stats().disk_rejected_files == 1
    again.disk.cache.flush()  # the block prefilled again was written through again: the tier heals
    healed = engine_with_disk(tiny_llama, tmp_path).generate([PROMPT], PARAMS)[0]
    assert (
        healed.metrics.disk_cached_prompt_tokens == 18 * 16 and healed.outputs[0].token_ids == cold.outputs[0].token_ids
    )


def test_the_disk_tier_is_capped_least_recently_used_first_and_cleans_up_partial_writes(tmp_path):
    block = {"k": torch.zeros(2, 2, 16, 16), "v": torch.ones(2, 2, 16, 16)}
    (tmp_path / "leftover.tmp").write_bytes(b"cut short")
    probe = DiskCache(tmp_path, 1 << 30, "fp", 16)
    assert not (tmp_path / "leftover.tmp").exists()
    probe.store("probe", list(range(16)), block)
    probe.flush()
    size = probe.bytes
    cache = DiskCache(tmp_path / "capped", 3 * size, "fp", 16)
    for i in range(5):
        cache.store(f"k{i}", list(range(i, i + 16)), block)
        cache.flush()
    assert cache.bytes <= 3 * size and sorted(p.stem for p in (tmp_path / "capped").glob("*.safetensors")) == [
        "k2",
        "k3",
        "k4",
    ]
    assert cache.load("k3", list(range(3, 19)))["v"].equal(block["v"]) and cache.load("k0", list(range(16))) is None
    with pytest.raises(ValueError, match="size must be > 0"):
        DiskCache(tmp_path, 0, "fp", 16)


def test_usage_and_metrics_say_how_many_tokens_came_from_disk(tiny_model, tmp_path):
    def engine() -> LLMEngine:  # test_serve_api's tiny model: it has a tokenizer, as a server needs
        return LLMEngine(
            EngineConfig(
                model=str(tiny_model),
                dtype="float32",
                max_model_len=512,
                kv_cache_bytes=8 << 20,
                kv_cache_disk=str(tmp_path / "disk"),
            )
        )

    first = engine()
    first.generate([PROMPT], PARAMS)
    first.disk.cache.flush()
    live = LiveServer(AsyncEngine(engine()))
    try:
        r = httpx.post(f"{live.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60).json()
        assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 288, "disk_cached_tokens": 288}
        assert "ministack:prefix_cache_disk_hits_total{" in httpx.get(f"{live.url}/metrics").text
    finally:
        live.close()


def test_the_disk_tier_needs_the_prefix_cache(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="needs enable_prefix_caching"):
        engine_with_disk(tiny_llama, tmp_path, enable_prefix_caching=False)
