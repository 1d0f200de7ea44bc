"""The training stages around the DiT: the latent cache (encode once, train on it) and the VAE stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.text_encoder import TextEncoder
from model.vae import load_codec
from train.config import load_train_config
from train.data.latent_cache import LatentCache
from train.data.latents import build_cache, build_cache_for
from train.data.loader import make_dataset
from train.step import dropped_captions

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
    assert (
        manifest["source"]["of"] == "config" and manifest["data_report"] is None
    )  # a function of the config: no files
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


def _images(folder, names, size=16):
    """PNG images with sidecar captions in `folder`: name -> its caption file."""
    import imageio.v3 as iio
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        iio.imwrite(folder / f"{name}.png", np.full((size, size, 3), 20 * k, np.uint8))
        (folder / f"{name}.txt").write_text(f"a flat picture called {name}")


def _folder_cfg(tmp_path, source, *extra):
    return _cfg(tmp_path, "data.kind=folder", f"data.source={source}", "data.buckets=[[1,16,16]]", *extra)


def _build(cfg):
    """build_cache on folder data (identity codec, no text encoder): (manifest, console lines, shard mtimes)."""
    lines = []
    manifest = build_cache(cfg, cfg.latent_cache, load_codec("identity"), None, shard_size=2, log=lines.append)
    shards = {p.name: p.stat().st_mtime_ns for p in Path(cfg.latent_cache).glob("*-*.safetensors")}
    return manifest, lines, shards


def test_folder_cache_reports_skipped_files_when_built_and_when_reused(tmp_path):
    import imageio.v3 as iio
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    clip = np.stack(
        [np.full((16, 16, 3), 60 * k, np.uint8) for k in range(3)]
    )  # distinct frames (a GIF merges equal ones)
    for name in ("a", "b", "c"):  # 3-frame clips: the one bucket's size
        iio.imwrite(data / f"{name}.gif", clip, loop=0)
        (data / f"{name}.txt").write_text(f"a dark clip called {name}")
    _images(data, ["still"])  # a single frame: no 3-frame bucket takes it
    (data / "junk.png").write_bytes(os.urandom(512))  # corrupt
    (data / "junk.txt").write_text("random bytes")
    iio.imwrite(data / "nocap.gif", clip, loop=0)  # no caption
    cfg = _folder_cfg(tmp_path, data, "data.buckets=[[3,16,16]]")

    manifest, lines, shards = _build(cfg)
    report = [line for line in lines if line.startswith("data: ")]
    assert len(report) == 1, lines
    assert report[0].startswith("data: 4 usable, 2 skipped: 1 corrupt (junk.png: "), report
    assert "1 no caption (nocap.gif)" in report[0] and report[0].endswith("; 1 without a bucket (still.png: 1x16x16)")
    assert manifest["clips"] == 3 and manifest["skipped"] == 3
    skipped = manifest["skipped_files"]
    assert skipped["total"] == 3 and skipped["by_reason"] == {"corrupt": 1, "no caption": 1, "without a bucket": 1}
    assert {(e["path"], e["reason"]) for e in skipped["listed"]} == {
        ("junk.png", "corrupt"),
        ("nocap.gif", "no caption"),
        ("still.png", "without a bucket"),
    }
    on_disk = json.loads((Path(cfg.latent_cache) / "cache.json").read_text())
    assert on_disk["skipped_files"] == skipped and on_disk["data_report"] == report[0].removeprefix("data: ")
    assert on_disk["source"]["of"] == "files" and on_disk["source"]["files"] == 11  # 6 media, 5 captions

    again, lines, unchanged = _build(cfg)  # reused: the same report, nothing encoded again
    assert again == manifest and unchanged == shards
    assert lines == [f"{report[0]} (as when the cache was built)"]


def test_folder_cache_is_rebuilt_when_its_source_changes(tmp_path):
    data = tmp_path / "data"
    _images(data, ["a", "b", "c", "d"])
    cfg = _folder_cfg(tmp_path, data)
    manifest, _, shards = _build(cfg)
    assert manifest["clips"] == 4 and manifest["source"]["files"] == 8

    _images(data / "more", ["e"])  # 2 files added (image + caption)
    (data / "a.png").unlink()  # 2 removed
    (data / "a.txt").unlink()
    (data / "b.txt").write_text("a flat picture, captioned again")  # 1 modified
    rebuilt, lines, _ = _build(cfg)
    assert (
        f"cache: {cfg.latent_cache}: 2 files added, 2 removed, 1 modified since the cache was built: rebuilding"
        in lines
    )
    cache = LatentCache(cfg.latent_cache)
    captions = {Path(cache[i].source).name: cache[i].caption for i in range(len(cache))}
    assert captions == {
        "b.png": "a flat picture, captioned again",
        "c.png": "a flat picture called c",
        "d.png": "a flat picture called d",
        "e.png": "a flat picture called e",
    }
    assert rebuilt["source"]["digest"] != manifest["source"]["digest"] and rebuilt["clips"] == 4

    _, lines, shards = _build(cfg)  # unchanged since: reused as it is
    assert not any("rebuilding" in line for line in lines)
    stamp = (data / "c.png").stat().st_mtime_ns
    os.utime(data / "c.png", ns=(stamp + 10**9, stamp + 10**9))  # touched, same bytes: mtime_ns tells
    _, lines, after = _build(cfg)
    assert (
        f"cache: {cfg.latent_cache}: 0 files added, 0 removed, 1 modified since the cache was built: rebuilding"
        in lines
    )
    assert after.keys() == shards.keys() and all(after[k] != shards[k] for k in shards)  # every shard encoded again

    # a build killed part-way, then the source changed: the partial shards are not resumed
    os.remove(Path(cfg.latent_cache) / "cache.json")
    kept = sorted(Path(cfg.latent_cache).glob("*-*.safetensors"))[0]
    _images(data, ["f"])
    _, lines, resumed = _build(cfg)
    assert any(
        line.endswith("2 files added, 0 removed, 0 modified since the partial build started: starting over")
        for line in lines
    ), lines
    assert len(LatentCache(cfg.latent_cache)) == 5 and resumed[kept.name] != after[kept.name]

    # a cache for another configuration is still refused, changed source or not
    other = _folder_cfg(tmp_path, data, "cache_dtype=float16")
    with pytest.raises(ValueError, match="use another latent_cache directory"):
        build_cache(other, other.latent_cache, load_codec("identity"), None)

    # the data moved away: the cache is kept and used, and that is said
    import shutil

    shutil.rmtree(data)
    manifest, lines, _ = _build(cfg)
    assert manifest["clips"] == 5 and len(LatentCache(cfg.latent_cache)) == 5
    assert any("no longer exists: using the cache as built (5 clips)" in line for line in lines), lines


def test_csv_cache_notices_an_edited_index(tmp_path):
    import imageio.v3 as iio
    import numpy as np

    _images(tmp_path / "media", ["a", "b"])
    cut = tmp_path / "media" / "cut.png"  # its header reads, its pixels do not: fails to decode while cached
    iio.imwrite(cut, np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    index = tmp_path / "clips.csv"
    index.write_text(
        "path,text\nmedia/a.png,first caption\nmedia/b.png,second caption\nmedia/gone.png,not there\n"
        "media/cut.png,half a file\n"
    )
    cfg = _folder_cfg(tmp_path, index)
    manifest, lines, _ = _build(cfg)
    assert manifest["source"]["files"] == 4  # the index and the three files it names that exist
    assert (
        "data: 3 usable, 1 skipped: 1 missing (media/gone.png: no such file); "
        "1 failed to decode (media/cut.png: OSError: image file is truncated)"
    ) in lines, lines
    assert manifest["skipped"] == 2 and manifest["skipped_files"]["by_reason"] == {"missing": 1, "failed to decode": 1}
    index.write_text(index.read_text().replace("first caption", "the first caption edited"))
    _, lines, _ = _build(cfg)
    assert (
        f"cache: {cfg.latent_cache}: 0 files added, 0 removed, 1 modified since the cache was built: rebuilding"
        in lines
    )
    _images(tmp_path / "media", ["gone"])  # the listed file appears
    _, lines, _ = _build(cfg)
    assert (
        f"cache: {cfg.latent_cache}: 1 file added, 0 removed, 0 modified since the cache was built: rebuilding" in lines
    )
    assert "data: 4 usable, 0 skipped; 1 failed to decode (media/cut.png: OSError: image file is truncated)" in lines
    os.remove(Path(cfg.latent_cache) / "cache.json")  # killed before the end: resumed with every shard kept,
    resumed, lines, _ = _build(cfg)  # the failure an earlier process met is still reported
    assert not any(line.startswith("cache: ") for line in lines), lines
    assert "data: 4 usable, 0 skipped; 1 failed to decode (media/cut.png: OSError: image file is truncated)" in lines
    assert resumed["skipped_files"]["listed"] == [
        {"path": "media/cut.png", "reason": "failed to decode", "detail": "OSError: image file is truncated"}
    ]
    cache = LatentCache(cfg.latent_cache)
    assert sorted(cache[i].caption for i in range(len(cache))) == [
        "not there",
        "second caption",
        "the first caption edited",
    ]


def test_caption_dropout_is_a_function_of_the_sample_seed():
    seeds = list(range(2000))
    drop = dropped_captions(seeds, 0.1)
    assert drop == dropped_captions(seeds, 0.1) and 0.07 < sum(drop) / len(drop) < 0.13
    assert dropped_captions(seeds[500:510], 0.1) == drop[500:510]  # whatever the batch it is in
    assert not any(dropped_captions(seeds, 0.0))


def test_training_on_the_cache_matches_training_on_pixels(tmp_path):
    common = ["--set", f"model={_model_yaml(tmp_path)}", "--set", "max_steps=6", "--set", "cond_drop=0.3"]

    def run(name, *extra):
        proc = subprocess.run(
            [sys.executable, "-m", "train", "--set", f"run_dir={tmp_path / name}", *SMALL, *common, *extra],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
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
    base = [
        *SMALL,
        "--set",
        f"run_dir={run}",
        "--set",
        "data.buckets=[[1,16,16],[5,16,16]]",
        "--set",
        f"model={_model_yaml(tmp_path)}",
    ]

    def stage(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "train", *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
        )
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
    proc = subprocess.run(
        [sys.executable, "-m", "train", "cache"], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 2 and "latent_cache" in proc.stderr and "Traceback" not in proc.stderr


def test_build_cache_for_loads_the_run_encoders(tmp_path):
    cfg = _cfg(tmp_path, "model=dit-s-8", "data.size=4", "data.buckets=[[1,16,16]]")  # class-conditional: no text
    manifest = build_cache_for(cfg)
    assert manifest["text"] is False and LatentCache(cfg.latent_cache)[0].context is None
