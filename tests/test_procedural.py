"""The procedural dataset (deterministic, varied, honest captions) and the probe that reads it back."""

import hashlib
import itertools
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import train.data.procedural as procedural
from train.data.procedural import (
    COLOURS,
    COLOUR_WORDS,
    DIRECTION_WORDS,
    MOTIONS,
    SCALE_WORDS,
    SHAPE_WORDS,
    SHAPES,
    SPIN_WORDS,
    VERBS,
    ProceduralVideos,
    caption,
)
from train.probe import alignment_score, probe

SEED = 123


def fingerprint(ds: ProceduralVideos, i: int) -> str:
    clip = ds[i]
    return hashlib.sha256(clip.video.numpy().tobytes() + clip.caption.encode()).hexdigest()


@pytest.fixture(scope="module")
def clips():
    ds = ProceduralVideos(300, seed=SEED)
    return [ds[i] for i in range(len(ds))]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z-]+", text.lower()))


def test_same_seed_and_index_give_the_same_clip_everywhere():
    ds = ProceduralVideos(50, seed=7)
    expected = [fingerprint(ds, i) for i in (0, 13, 49)]
    assert expected == [fingerprint(ProceduralVideos(50, seed=7), i) for i in (0, 13, 49)]  # fresh instance
    assert [fingerprint(ds, i) for i in (49, 13, 0)] == expected[::-1]  # order of access is irrelevant
    script = (
        "import hashlib; from train.data.procedural import ProceduralVideos; ds = ProceduralVideos(50, seed=7)\n"
        "for i in (0, 13, 49):\n c = ds[i]; print(hashlib.sha256(c.video.numpy().tobytes() + c.caption.encode()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == expected
    assert fingerprint(ProceduralVideos(50, seed=8), 0) != expected[0]


def test_variety_of_sizes_durations_and_content():
    ds = ProceduralVideos(400, seed=SEED)
    described = [ds.describe(i)[0] for i in range(len(ds))]
    assert {(a["height"], a["width"]) for a in described} == {(32, 32), (32, 48), (48, 32), (64, 64)}
    assert {a["frames"] for a in described} == {1, 5, 9, 13, 17}
    assert {a["fps"] for a in described} == {8.0, 12.0, 16.0, 24.0}
    assert {a["shape"] for a in described} == set(SHAPES)
    assert {a["colour"] for a in described} == set(COLOURS)
    assert {a["motion"] for a in described} == set(MOTIONS)
    assert {a["background_kind"] for a in described} == {"plain", "gradient", "texture"}
    assert {a["scaling"] for a in described} == {"none", "growing", "shrinking"}
    assert any(a["bouncing"] for a in described) and any(a["rotating"] for a in described)
    for a in described:
        if a["frames"] == 1:  # images are still
            assert (a["motion"], a["bouncing"], a["rotating"], a["scaling"]) == ("static", False, False, "none")
        assert a["shape"] != "circle" or not a["rotating"]
    four = ProceduralVideos(
        2, resolutions=((16, 16),), frames=(4,)
    )  # any length: a run's buckets are checked against its codec
    assert four[0].video.shape[1:] == (4, 16, 16)
    assert len(list(ProceduralVideos(3))) == 3  # IndexError past the end stops iteration


def test_captions_vary_in_phrasing_for_the_same_attributes():
    attrs = ProceduralVideos(10, seed=SEED, frames=(9,)).describe(0)[0]
    phrasings = {caption(attrs, np.random.default_rng(k)) for k in range(30)}
    assert len(phrasings) >= 15
    assert caption({"colour": "blue", "shape": "circle", "motion": "up"}) == "a blue circle moving up"
    assert caption({"colour": "red", "shape": "square", "frames": 1}) == "a red square"
    captions = [ProceduralVideos(200, seed=SEED).describe(i)[1] for i in range(200)]
    assert len(set(captions)) > 190


def test_values_dtype_and_shapes(clips):
    ds = ProceduralVideos(300, seed=SEED)
    for i, clip in enumerate(clips):
        v = clip.video
        assert v.dtype == torch.float32 and v.shape[0] == 3 and tuple(v.shape[1:]) == ds.size_of(i)
        assert v.min() >= -1 and v.max() <= 1 and v.max() == 1  # every palette colour saturates a channel
        assert clip.fps == clip.attrs["fps"] and clip.source == f"procedural:{i}"


def test_size_of_and_describe_do_not_render(monkeypatch):
    ds = ProceduralVideos(100, seed=SEED)
    expected = [tuple(ds[i].video.shape[1:]) for i in range(20)]

    def no_render(attrs):
        raise AssertionError("rendered")

    monkeypatch.setattr(procedural, "render", no_render)
    assert [ds.size_of(i) for i in range(20)] == expected
    assert [(a["frames"], a["height"], a["width"]) for a, _ in map(ds.describe, range(20))] == expected


def test_captions_state_the_attributes(clips):
    for clip in clips:
        a, text = clip.attrs, clip.caption
        assert any(w in text for w in COLOUR_WORDS[a["colour"]]), text
        assert any(w in text for w in SHAPE_WORDS[a["shape"]]), text
        claims_motion = bool(words(text) & set(VERBS)) or "bouncing" in text
        if a["motion"] == "static":
            assert not claims_motion, text
        else:
            assert any(w in text for w in DIRECTION_WORDS[a["motion"]]) and claims_motion, text
            assert ("bouncing" in text) == a["bouncing"], text
        if a["frames"] == 1:
            assert not words(text) & (set(SPIN_WORDS) | {"growing", "shrinking", "expanding", "still"}), text
        if a["scaling"] != "none":
            assert any(w in text for w in SCALE_WORDS[a["scaling"]]), text


def test_probe_reads_the_dataset_back(clips):
    preds = [probe(c.video) for c in clips]
    moving = [(p, c) for p, c in zip(preds, clips) if c.attrs["motion"] != "static"]
    still_videos = [(p, c) for p, c in zip(preds, clips) if c.attrs["motion"] == "static" and c.attrs["frames"] > 1]
    colour = np.mean([p["colour"] == c.attrs["colour"] for p, c in zip(preds, clips)])
    shape = np.mean([p["shape"] == c.attrs["shape"] for p, c in zip(preds, clips)])
    motion = np.mean([p["motion"] == c.attrs["motion"] for p, c in moving])
    bouncing = np.mean([p["motion"] == c.attrs["motion"] for p, c in moving if c.attrs["bouncing"]])
    still = np.mean([p["motion"] == "static" for p, _ in still_videos])
    print(
        f"probe on {len(clips)} clips: colour {colour:.3f}, shape {shape:.3f}, motion {motion:.3f} "
        f"({len(moving)} moving; bouncing {bouncing:.3f}), static videos {still:.3f} ({len(still_videos)})"
    )
    assert colour >= 0.95 and motion >= 0.90 and bouncing >= 0.90 and shape >= 0.85 and still >= 0.9
    as_uint8 = [probe(((c.video.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8)) for c in clips[:30]]
    read = [(p["colour"], p["motion"], p["shape"]) for p in as_uint8]
    assert read == [(p["colour"], p["motion"], p["shape"]) for p in preds[:30]]


def test_probe_of_an_empty_frame():
    nothing = {"colour": None, "motion": "static", "shape": None, "frames": 5, "present": 0.0}
    assert probe(torch.full((3, 5, 32, 32), -0.8)) == nothing


def test_alignment_score_against_ground_truth_and_shuffled_prompts(clips):
    videos, truth = [c.video for c in clips], [c.attrs for c in clips]
    right = alignment_score(videos, truth)
    assert right["uniform"] == pytest.approx({"colour": 1 / 7, "motion": 1 / 9, "shape": 1 / 4})
    assert right["n"] == {"colour": 300, "shape": 300, "motion": sum(c.attrs["frames"] > 1 for c in clips)}
    assert right["score"] >= 0.95 and right["all"] >= 0.9
    for a, level in right["chance"].items():  # balanced draws: chance is close to 1 / classes
        assert abs(level - right["uniform"][a]) < 0.04, a
    order = list(range(len(clips)))
    random.Random(0).shuffle(order)
    shuffled = alignment_score(videos, [truth[j] for j in order])
    print(
        f"ground truth: score {right['score']:.3f} vs chance {right['score_chance']:.3f}; "
        f"shuffled prompts: score {shuffled['score']:.3f}, {shuffled['accuracy']} vs chance {shuffled['chance']}"
    )
    assert shuffled["chance"] == right["chance"]  # chance depends on the two marginals only
    for a, acc in shuffled["accuracy"].items():
        assert abs(acc - shuffled["chance"][a]) < 0.07, a
    assert abs(shuffled["score"] - shuffled["score_chance"]) < 0.05 and shuffled["all"] < 0.05


def test_chance_is_the_exact_expectation_over_shuffles(clips):
    sample = [clips[i] for i in (0, 1, 2, 3, 4, 5)]
    assert any(c.attrs["frames"] == 1 for c in sample) and any(c.attrs["frames"] > 1 for c in sample)
    prompts = [c.attrs for c in reversed(sample)]
    result = alignment_score([c.video for c in sample], prompts)
    preds = result["predictions"]
    scored = {
        a: [i for i, p in enumerate(preds) if a != "motion" or p["frames"] > 1] for a in ("colour", "motion", "shape")
    }
    totals = {a: 0.0 for a in (*scored, "all")}
    perms = list(itertools.permutations(range(len(sample))))
    for perm in perms:
        for a, idx in scored.items():
            totals[a] += np.mean([preds[i][a] == prompts[perm[i]][a] for i in idx])
        hits = [all(preds[i][a] == prompts[perm[i]][a] for a in scored if i in scored[a]) for i in range(len(sample))]
        totals["all"] += np.mean(hits)
    for a in scored:
        assert result["chance"][a] == pytest.approx(totals[a] / len(perms))
    assert result["all_chance"] == pytest.approx(totals["all"] / len(perms))
