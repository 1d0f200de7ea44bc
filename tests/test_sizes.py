"""Size checks: one rule (codec compression x DiT patch) everywhere; a refused size names the
nearest sizes that fit, and those really run: through the codec, the DiT, the pipeline, the
`ministack sample` command, training buckets and `ministack flops count`."""

import argparse
import json
import random
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from model.diffusion import make_scheduler
from model.dit import DiT, DiTConfig
from model.patches import patchify, unpatchify
from model.pipeline import MiniStackPipeline
from model.sizes import SizeError, SizeRule
from model.text_encoder import TextEncoder
from model.vae import codec_compression, load_codec

COMPRESSIONS = [(1, 1, 1), (2, 4, 4), (4, 8, 8), (1, 8, 8), (3, 2, 5)]
PATCHES = [(1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 4, 4), (2, 1, 3)]
SUGGESTED = re.compile(r"(\d+) frames? at (\d+)x(\d+)")


def _suggested(message: str) -> list[tuple[int, int, int]]:
    """The sizes a refusal names after 'nearest sizes that fit:'."""
    tail = message.split("nearest sizes that fit:")[1]
    return [tuple(map(int, m)) for m in SUGGESTED.findall(tail)]


def _brute_nearest(value: int, valid: list[int]) -> tuple[int, int]:
    below = [v for v in valid if v <= value]
    above = [v for v in valid if v >= value]
    return (below[-1] if below else valid[0]), above[0]


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("patch", PATCHES)
def test_suggestions_fit_and_are_the_nearest(compression, patch):
    """Against brute force: the valid values per axis are exactly those whose latent the patch
    tiles, and the suggestions are each axis rounded down / up to them (never to 0)."""
    rule, rng = SizeRule(compression, patch), random.Random(0)
    (ct, ch, cw), (pt, ph, pw) = compression, patch
    valid = (
        [f for f in range(1, 400) if (f - 1) % ct == 0 and (1 + (f - 1) // ct) % pt == 0],
        [h for h in range(1, 400) if h % ch == 0 and (h // ch) % ph == 0],
        [w for w in range(1, 400) if w % cw == 0 and (w // cw) % pw == 0],
    )
    for _ in range(300):
        size = (rng.randint(-2, 120), rng.randint(-2, 200), rng.randint(-2, 200))
        assert rule.fits(size) == all(v in axis for v, axis in zip(size, valid))
        nearest = rule.nearest(size)
        assert all(rule.fits(s) and min(s) >= 1 for s in nearest)
        down, up = zip(*(_brute_nearest(v, axis) for v, axis in zip(size, valid)))
        assert nearest == ([down] if down == up else [down, up])
        if rule.fits(size):
            assert nearest == [size]
            t, h, w = rule.latent(size)
            assert (t % pt, h % ph, w % pw) == (0, 0, 0) and (1 + (t - 1) * ct, h * ch, w * cw) == size
        else:
            with pytest.raises(SizeError) as err:
                rule.latent(size)
            assert err.value.suggestions == nearest == _suggested(str(err.value))


@pytest.mark.parametrize("codec_name", ["identity", "tiny"])
@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 4, 4), (2, 1, 3)])
def test_suggested_sizes_run_through_codec_and_dit(codec_name, patch):
    """Every suggestion for a refused size encodes, patchifies, runs the DiT and decodes back to
    itself; the refused size itself fails in the codec or the DiT."""
    codec = load_codec(codec_name)
    rule, rng = SizeRule(codec.compression, patch), random.Random(1)
    torch.manual_seed(0)
    dit = DiT.from_dit_config(
        DiTConfig(in_channels=codec.latent_channels, patch_size=patch, hidden_size=16, depth=1, num_heads=2)
    )
    tried = 0
    while tried < 3:
        size = (rng.randint(1, 9), rng.randint(4, 36), rng.randint(4, 36))
        if rule.fits(size):
            continue
        tried += 1
        with pytest.raises(ValueError):  # the components refuse it too (no silent remainder)
            dit(codec.encode(torch.zeros(1, 3, *size)), torch.zeros(1))
        for frames, height, width in rule.nearest(size):
            with torch.no_grad():
                z = codec.encode(torch.zeros(1, 3, frames, height, width))
                assert z.shape == (1, codec.latent_channels, *rule.latent((frames, height, width)))
                assert torch.equal(
                    unpatchify(patchify(z, patch), patch, [s // p for s, p in zip(z.shape[2:], patch)]), z
                )
                assert dit(z, torch.zeros(1)).shape == z.shape
                assert codec.decode(z).shape == (1, 3, frames, height, width)


def test_pipeline_refuses_before_any_work_and_samples_the_suggestion():
    codec = load_codec("tiny")
    cfg = DiTConfig(in_channels=4, patch_size=(2, 2, 2), hidden_size=16, depth=1, num_heads=2, num_classes=2)
    pipe = MiniStackPipeline(DiT.from_dit_config(cfg), make_scheduler("flow"), codec)
    assert pipe.size_rule == SizeRule((2, 4, 4), (2, 2, 2))
    with pytest.raises(
        SizeError, match=r"^frames 1, height 30, width 20 do not fit codec compression 2,4,4 × patch 2,2,2"
    ) as err:
        pipe(frames=1, height=30, width=20, class_labels=[0], num_inference_steps=1)
    for frames, height, width in err.value.suggestions:
        out = pipe(frames=frames, height=height, width=width, class_labels=[0], num_inference_steps=1)
        assert out.videos.shape == (1, frames, height, width, 3)


def test_saved_pipeline_rule_is_read_from_its_configs(tmp_path):
    pipe = MiniStackPipeline.build(config="configs/models/tiny-p4.yaml", codec="tiny")
    pipe.save_pretrained(tmp_path / "pipe")
    assert MiniStackPipeline.saved_size_rule(tmp_path / "pipe") == pipe.size_rule == SizeRule((2, 4, 4), (1, 4, 4))
    assert MiniStackPipeline.build_size_rule("configs/models/tiny-p4.yaml", "tiny") == pipe.size_rule
    assert codec_compression(str(tmp_path / "pipe" / "codec")) == codec_compression("tiny") == (2, 4, 4)
    with pytest.raises(ValueError, match="not a saved ministack pipeline"):
        MiniStackPipeline.saved_size_rule(tmp_path)


@contextmanager
def nothing_loads():
    """Loading the pipeline or the text encoder fails the test: a size error must come first."""

    def refuse(*args, **kwargs):
        pytest.fail("the pipeline loaded before the size was checked")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(MiniStackPipeline, "build", refuse)
        m.setattr(MiniStackPipeline, "from_pretrained", refuse)
        m.setattr(TextEncoder, "__init__", refuse)
        yield


@pytest.mark.parametrize("height, width", [(30, 30), (36, 44)])
def test_sample_command_refuses_up_front_with_a_suggestion_that_samples(height, width, tmp_path, capsys):
    from model.media import read_frames
    from model.sample import main

    with nothing_loads():
        assert main(["--prompt", "x", "--height", str(height), "--width", str(width)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"ministack sample: error: --height {height}, --width {width} do not fit "
        "codec compression 2,4,4 × patch 1,2,2 (frames 1 + 2k (1, 3, 5, ...), height and width multiples of 8)"
    )
    suggestions = _suggested(err)
    rule = MiniStackPipeline.build_size_rule()
    assert suggestions == rule.nearest((9, height, width)) and all(rule.fits(s) for s in suggestions)
    frames, height, width = suggestions[0]
    stem = tmp_path / "s"
    assert (
        main(
            [
                "--prompt",
                "x",
                "--frames",
                str(frames),
                "--height",
                str(height),
                "--width",
                str(width),
                "--steps",
                "1",
                "--out",
                str(stem),
            ]
        )
        == 0
    )
    assert read_frames(stem.with_suffix(".mp4")).shape == (frames, height, width, 3)


def test_sample_command_checks_the_clip_to_extend_up_front(tmp_path, capsys):
    import numpy as np

    from model.media import write_video
    from model.sample import main

    write_video(tmp_path / "clip.mp4", np.zeros((4, 16, 16, 3), np.uint8), fps=8)
    args = ["--prompt", "x", "--video", str(tmp_path / "clip.mp4"), "--height", "16", "--width", "16"]
    with nothing_loads():
        assert main([*args, "--extend", "forward", "--frames", "9"]) == 2
        assert "the --video clip's frame count 4 does not fit codec compression 2,4,4 (" in capsys.readouterr().err
        assert main([*args, "--strength", "0.5"]) == 2  # SDEdit: the output has the clip's 4 frames
    err = capsys.readouterr().err
    assert "the --video clip's frame count 4 does not fit codec compression 2,4,4 × patch 1,2,2" in err
    assert _suggested(err) == [(3, 16, 16), (5, 16, 16)]


def test_training_buckets_are_refused_at_config_load():
    from train.config import load_train_config

    with pytest.raises(
        SizeError,
        match=r"^data.buckets: bucket 4x30x32: frames 4, height 30 do not fit codec compression 2,4,4 × patch 1,2,2",
    ) as err:
        load_train_config(None, ["codec=tiny", "data.buckets=[[1,32,32],[4,30,32]]"])
    assert err.value.suggestions == [(3, 24, 32), (5, 32, 32)]
    for frames, height, width in err.value.suggestions:
        load_train_config(None, ["codec=tiny", f"data.buckets=[[{frames},{height},{width}]]"])
    with pytest.raises(SizeError) as err:  # the VAE stage needs only its codec's factors
        load_train_config(None, ["codec=tiny", "data.buckets=[[4,30,32]]"], stage="vae")
    assert err.value.suggestions == [(3, 28, 32), (5, 32, 32)]
    with pytest.raises(
        SizeError, match=r"height 18, width 18 do not fit patch 1,4,4 .* 1 frame at 16x16 or 1 frame at 20x20$"
    ):
        load_train_config(None, ["model=configs/models/tiny-p4.yaml", "data.buckets=[[1,18,18]]"])


def test_a_per_bucket_batch_size_for_a_bucket_not_trained_is_refused_at_config_load():
    from train.config import load_train_config

    # configs/train/tiny.yaml sets a batch size for 5x32x32; overriding the buckets leaves it stray
    with pytest.raises(
        ValueError,
        match=r"bucket_batch_size names buckets not in data.buckets: 5x32x32 "
        r"\(buckets: 1x16x16, 3x16x16\); drop it with --set data.bucket_batch_size=\{\}",
    ):
        load_train_config("configs/train/tiny.yaml", ["data.buckets=[[1,16,16],[3,16,16]]"])
    cfg = load_train_config(
        "configs/train/tiny.yaml", ["data.buckets=[[1,16,16],[3,16,16]]", "data.bucket_batch_size={}"]
    )
    assert cfg.data.bucket_batch_size == {}


def _count_args(*argv: str) -> argparse.Namespace:
    from model.flops import count

    parser = argparse.ArgumentParser()
    count.add_arguments(parser)
    return parser.parse_args(["tiny", "--json", *argv])


def test_flops_count_refuses_with_a_suggestion_that_counts(capsys):
    """`flops count` maps pixels to the latent as the codec does (1 + (frames-1)/ct) and takes only
    what the DiT tiles: the model it counts runs on exactly that latent."""
    from model.flops.count import run

    with pytest.raises(
        SizeError, match=r"^--frames 16, --height 120 do not fit codec compression 4,8,8 × patch 1,2,2"
    ) as err:
        run(_count_args("--frames", "16", "--height", "120", "--width", "128", "--latent-compression", "4,8,8"))
    assert err.value.suggestions == [(13, 112, 128), (17, 128, 128)]
    for frames, height, width in err.value.suggestions:
        assert (
            run(
                _count_args(
                    "--frames",
                    str(frames),
                    "--height",
                    str(height),
                    "--width",
                    str(width),
                    "--latent-compression",
                    "4,8,8",
                )
            )
            == 0
        )
        r = json.loads(capsys.readouterr().out)
        assert r["latent"] == [1 + (frames - 1) // 4, height // 8, width // 8]
        assert r["tokens"] == DiTConfig(patch_size=(1, 2, 2)).num_tokens(*r["latent"])
    with pytest.raises(
        SizeError, match=r"^--latent H 9 does not fit patch 1,2,2 .*: 3 frames at 8x8 or 3 frames at 10x8$"
    ):
        run(_count_args("--latent", "3,9,8"))
    with pytest.raises(SizeError, match=r"^--image-size 100 does not fit codec compression 1,8,8 × patch 1,2,2"):
        run(_count_args("--image-size", "100"))


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))
)
def test_every_shipped_run_config_loads_and_its_buckets_fit_its_model(config):
    from model.configs import load_config
    from train.config import load_train_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_train_config(str(root / "configs" / "train" / config), [], "dit")  # validates, sizes included
    model = load_config(str(root / cfg.model) if cfg.model.endswith(".yaml") else cfg.model)
    assert all(model.num_tokens(*bucket) > 0 for bucket in cfg.data.buckets)
