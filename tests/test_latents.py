"""The training stages around the DiT: the latent cache (encode once, train on it) and the VAE stage."""

import json
import os
import subprocess
import sys

import pytest
import torch

from model.text_encoder import TextEncoder
from model.vae import load_codec
from train.config import load_train_config
from train.data.latents import LatentCache, build_cache, build_cache_for
from train.data.loader import make_dataset
from train.loop import dropped_captions

from test_train import ROOT, SMALL, _env, _losses, _model_yaml

DATA = ["data.size=20", "data.buckets=[[1,16,16],[3,16,16]]"]


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder()


def _cfg(tmp_path, *extra):
    return load_train_config(None, [f"latent_cache={tmp_path / 'cache'}", *DATA, *extra])


def test_cache_holds_exactly_what_the_encoders_give(tmp_path, text_encoder):
    cfg = _cfg(tmp_path)
    manifest = build_cache(cfg, cfg.latent_cache, load_codec("identity"), text_encoder, shard_size=4)
    cache, data = LatentCache(cfg.latent_cache), make_dataset(cfg.data)
    assert len(cache) == manifest["clips"] == 20 and manifest["skipped"] == 0 and manifest["frozen_flops"] > 0
    position = {cache[i].source: i for i in range(len(cache))}
    for i in (0, 7, 19):
        clip, at = data[i], position[f"procedural:{i}"]
        cached = cache[at]
        assert cached.caption == clip.caption and cache.size_of(at) == tuple(clip.video.shape[1:])
        assert torch.equal(cached.latents, clip.video)  # identity codec, float32: bit-exact
        context, mask = text_encoder([clip.caption], pad_to_max_length=True)
        assert torch.allclose(cached.context, context[0], atol=1e-5) and torch.equal(cached.context_mask, mask[0])
    null_context, null_mask = cache.null_context()
    assert null_mask.sum() == 2  # [CLS] [SEP]: the empty caption


def test_cache_build_resumes_and_refuses_another_configuration(tmp_path, text_encoder):
    cfg = _cfg(tmp_path)
    build_cache(cfg, cfg.latent_cache, load_codec("identity"), text_encoder, shard_size=4)
    root = tmp_path / "cache"
    shards = sorted(root.glob("*-*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    os.remove(root / "cache.json")  # as if killed before the end: one shard missing, one half-written
    os.remove(shards[2])
    os.remove(shards[2].with_suffix(".json"))
    (root / f".{shards[3].name}.tmp123").write_bytes(b"partial")
    manifest = build_cache(cfg, cfg.latent_cache, load_codec("identity"), text_encoder, shard_size=4)
    assert manifest["clips"] == 20 and len(LatentCache(root)) == 20
    rebuilt = [p for p in shards if p.stat().st_mtime_ns != stamps.get(p)]
    assert rebuilt == [shards[2]]  # only the missing shard was encoded again
    assert not list(root.glob(".*.tmp*"))  # the half-written one was cleared
    other = _cfg(tmp_path, "codec=tiny")
    with pytest.raises(ValueError, match="use another latent_cache directory"):
        build_cache(other, other.latent_cache, load_codec("tiny"), text_encoder)


def test_caption_dropout_is_a_function_of_the_sample_seed():
    seeds = list(range(2000))
    drop = dropped_captions(seeds, 0.1)
    assert drop == dropped_captions(seeds, 0.1) and 0.07 < sum(drop) / len(drop) < 0.13
    assert dropped_captions(seeds[500:510], 0.1) == drop[500:510]  # whatever the batch it is in
    assert not any(dropped_captions(seeds, 0.0))


def test_training_on_the_cache_matches_training_on_pixels(tmp_path):
    common = ["--set", f"model={_model_yaml(tmp_path)}", "--set", "max_steps=6", "--set", "cond_drop=0.3"]

    def run(name, *extra):
        proc = subprocess.run([sys.executable, "-m", "train", "--set", f"run_dir={tmp_path / name}", *SMALL, *common, *extra],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    run("pixels")
    out = run("cached", "--set", f"latent_cache={tmp_path / 'cache'}")
    assert "latent cache" in out and "48 clips (0 skipped)" in out
    pixels, cached = _losses(tmp_path / "pixels"), _losses(tmp_path / "cached")
    assert cached.keys() == pixels.keys() and all(cached[k] == pytest.approx(pixels[k], rel=1e-4) for k in pixels)
    ledger = [json.loads(line) for line in (tmp_path / "cached" / "ledger.jsonl").read_text().splitlines()]
    assert all("frozen" not in r["parts"] for r in ledger)  # the encoders ran once, in the cache stage


def test_vae_stage_then_cache_stage_then_dit_on_its_latents(tmp_path):
    """The three stages as a user chains them: train the VAE, cache with it, train the DiT."""
    run = tmp_path / "run"
    base = [*SMALL, "--set", f"run_dir={run}", "--set", "data.buckets=[[1,16,16],[5,16,16]]",
            "--set", f"model={_model_yaml(tmp_path)}"]

    def stage(*args):
        proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    out = stage("vae", *base, "--set", "vae.steps=30", "--set", "vae.lr=3e-3", "--set", "checkpoint_every=10")
    codec_dir = run / "codec"
    log = [json.loads(line) for line in (run / "vae" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and min(r["l1"] for r in log[-5:]) < 0.7 * log[0]["l1"]
    result = json.loads((codec_dir / "eval.json").read_text())
    assert result["psnr"] > 10 and f"codec saved to {codec_dir}" in out
    codec = load_codec(str(codec_dir))
    assert codec.compression == (2, 4, 4) and not any(p.requires_grad for p in codec.parameters())

    cached = [*base, "--set", f"codec={codec_dir}", "--set", f"latent_cache={tmp_path / 'cache'}"]
    out = stage("cache", *cached)
    assert "48 clips, 0 skipped" in out
    latents = torch.cat([LatentCache(tmp_path / "cache")[i].latents.flatten(1) for i in range(48)], 1)
    assert latents.mean(1).abs().max() < 0.5 and (latents.std(1) - 1).abs().max() < 0.5  # fitted normalization
    stage(*cached, "--set", "max_steps=2")
    assert len(_losses(run)) == 2


def test_cache_stage_without_a_directory_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "train", "cache"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "latent_cache" in proc.stderr and "Traceback" not in proc.stderr


def test_build_cache_for_loads_the_run_encoders(tmp_path):
    cfg = _cfg(tmp_path, "model=dit-s-8", "data.size=4", "data.buckets=[[1,16,16]]")  # class-conditional: no text
    manifest = build_cache_for(cfg)
    assert manifest["text"] is False and LatentCache(cfg.latent_cache)[0].context is None
