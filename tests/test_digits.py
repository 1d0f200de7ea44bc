"""Moving handwritten digits: deterministic clips of the bucket's size, digits inside the frame,
validation clips drawn only from held-out scans, and a short training run on them."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.config import DataConfig, TrainConfig
from train.data.buckets import assign_bucket
from train.data.digits import NUMBER_WORDS, MovingDigits, caption, scans, split_scans, track
from train.data.loader import make_dataset, make_loader
from train.evaluate import alignment_prompts, held_out_set
from train.probe import alignment_score

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = [[1, 16, 16], [5, 16, 24], [3, 32, 32]]


def fingerprint(ds: MovingDigits, i: int) -> str:
    clip = ds[i]
    return hashlib.sha256(clip.video.numpy().tobytes() + clip.caption.encode()).hexdigest()


def test_same_seed_and_index_give_the_same_clip():
    ds = MovingDigits(40, seed=3)
    expected = [fingerprint(ds, i) for i in (0, 17, 39)]
    assert [fingerprint(MovingDigits(40, seed=3), i) for i in (39, 17, 0)] == expected[::-1]
    assert fingerprint(MovingDigits(40, seed=4), 0) != expected[0]
    assert fingerprint(MovingDigits(40, seed=3, split="val"), 0) != expected[0]  # another scan


def test_clips_have_their_bucket_size_and_the_value_range():
    cfg = DataConfig(kind="digits", size=60, buckets=BUCKETS, batch_size=2)
    ds = make_dataset(cfg)
    assert isinstance(ds, MovingDigits) and ds.split == "train"
    seen = set()
    for i in range(len(ds)):
        clip = ds[i]
        size = tuple(clip.video.shape[1:])
        assert clip.video.shape[0] == 3 and size == ds.size_of(i) and assign_bucket(size, BUCKETS) == size
        seen.add(size)
        v = clip.video
        assert v.dtype.is_floating_point and v.min() >= -1 and v.max() <= 1
        assert (v[0] == v[1]).all() and (v[0] == v[2]).all()  # grey
        assert (
            v.min() == -1 and v.max() > 0
        )  # black background; ink over half-bright (a 16 px frame averages thin strokes)
        if size[0] == 1:
            assert clip.attrs["motion"] == "static" and "moving" not in clip.caption and "bouncing" not in clip.caption
    assert seen == {tuple(b) for b in BUCKETS}
    loader, _, _ = make_loader(cfg)
    for batch in loader:
        assert tuple(batch["video"].shape[2:]) == batch["bucket"] and batch["video"].shape[:2] == (2, 3)


def test_train_and_validation_clips_use_disjoint_scans():
    labels = scans()[1]
    train, val = split_scans(labels)
    assert len(train) + len(val) == len(labels) == 1797 and not set(train) & set(val)
    counts = np.bincount(labels[val], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(counts - 0.15) < 0.01)  # about 15 % of every digit held out
    cfg = TrainConfig()
    cfg.data.kind, cfg.data.buckets = "digits", BUCKETS
    training = make_dataset(cfg.data)
    held_out = held_out_set(cfg.data, 300, 5, 16, 16)
    assert held_out.split == "val" and held_out.seed == cfg.data.seed + 1
    used_train = {d["scan"] for i in range(300) for d in training.describe(i)[0]["digits"]}
    used_val = {d["scan"] for i in range(300) for d in held_out.describe(i)[0]["digits"]}
    assert used_train <= set(train) and used_val <= set(val) and not used_train & used_val
    assert len(used_val) > 100  # spread over the held-out scans, not a handful
    cfg.data.kind = "procedural"
    assert type(held_out_set(cfg.data, 2, 5, 16, 16)).__name__ == "ProceduralVideos"


def test_digits_stay_inside_the_frame_and_bounce_after_halfway():
    ds = MovingDigits(80, seed=1, sizes=((9, 16, 16), (17, 32, 48)), two_digit_fraction=0.3)
    bounces = 0
    for i in range(len(ds)):
        clip = ds[i]
        a, ink = clip.attrs, clip.video[0].numpy() + 1  # [T, H, W], 0 = background
        t, h, w = ink.shape
        boxes = np.zeros_like(ink, bool)
        for digit in a["digits"]:
            top, left = track(digit, t)
            assert top.min() >= 1 and left.min() >= 1  # one pixel clear of the border
            assert (top + digit["side"]).max() <= h - 1 + 1e-9 and (left + digit["side"]).max() <= w - 1 + 1e-9
            for k in range(t):
                ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
                boxes[k] |= ((ys > top[k]) & (ys < top[k] + digit["side"]))[:, None] & (
                    (xs > left[k]) & (xs < left[k] + digit["side"])
                )[None, :]
            # the path leaves the straight line (bounces) iff the attrs say so, never in the first half
            straight = np.array(digit["start"])[:, None] + np.array(digit["velocity"])[:, None] * np.arange(t)
            off = np.abs(np.stack([top, left]) - straight).max(0) > 1e-6
            assert off.any() == digit["bouncing"] and not off[: (t - 1) // 2 + 1].any()
            bounces += digit["bouncing"]
        assert (ink[~boxes] == 0).all() and ink[boxes].max() > 1  # ink only inside the boxes (ink here is 0..2)
        if len(a["digits"]) == 1:  # nothing is cut off: the ink is about the same in every frame
            total = ink.sum((1, 2))
            assert total.min() > 0.9 * total.max()
            assert str(a["digits"][0]["label"]) in clip.caption or NUMBER_WORDS[a["digits"][0]["label"]] in clip.caption
    assert 0 < bounces < len(ds)


def test_captions_and_the_probe_read_the_motion_back():
    assert (
        caption({"frames": 9, "digits": [{"label": 3, "motion": "up-left"}]}) == "the digit 3 moving up and to the left"
    )
    assert caption({"frames": 1, "digits": [{"label": 7, "motion": "static"}]}) == "the digit 7"
    prompts = alignment_prompts(6, frames=9, data_kind="digits")
    assert all(
        set(p) == {"motion", "frames", "label", "digits"} and p["digits"][0]["label"] == p["label"] for p in prompts
    )
    assert len({p["motion"] for p in prompts}) > 1 and "static" not in {p["motion"] for p in prompts}
    ds = MovingDigits(24, seed=2, sizes=((9, 32, 32),))
    truth = [ds.describe(i)[0] for i in range(len(ds))]
    scored = alignment_score([ds[i].video for i in range(len(ds))], truth)
    assert list(scored["accuracy"]) == ["motion"] and scored["score"] > scored["score_chance"] + 0.5


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="'procedural', 'digits' or 'folder'"):
        make_dataset(DataConfig(kind="mnist"))
    with pytest.raises(ValueError, match="unknown split"):
        MovingDigits(4, split="test")


def test_a_short_training_run_on_digits(tmp_path):
    (tmp_path / "model.yaml").write_text("model: {preset: tiny, hidden_size: 32, depth: 2, num_heads: 2}\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))
    }
    args = [
        sys.executable,
        "-m",
        "train",
        "--set",
        f"run_dir={tmp_path / 'run'}",
        "--set",
        f"model={tmp_path / 'model.yaml'}",
        "--set",
        "data.kind=digits",
        "--set",
        "data.size=48",
        "--set",
        "data.batch_size=2",
        "--set",
        "data.buckets=[[1,16,16],[3,16,16]]",
        "--set",
        "max_steps=2",
        "--set",
        "warmup_steps=1",
        "--set",
        "val_clips=4",
        "--set",
        "eval_prompts=4",
        "--set",
        "eval_sampling_steps=2",
    ]
    proc = subprocess.run(
        args, cwd=ROOT, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    final = json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])
    assert final["val_loss"] > 0 and final["val_clips"] == 4
    # read by the judge (a classifier validated on real clips) for the digit and by the centroid for the motion
    assert list(final["accuracy"]) == ["class", "motion"] and final["chance"] == {"class": 0.1, "motion": 0.125}
    assert final["judge"]["class"] >= 0.9 and final["fd"] > final["fd_floor"] > 0
    assert any("the digit" in p for p in final["prompts"])
    # the saved pipeline evaluated again with other settings: one more record, as at the end of training
    again = subprocess.run(
        args[:3]
        + ["evaluate"]
        + args[3:]
        + ["--set", "eval_prompts=8", "--set", "eval_guidance=1.5", "--set", "eval_guidance_interval=[0.1,0.8]"],
        cwd=ROOT,
        env=env | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[-1]["step"] == 2 and records[-1]["guidance"] == 1.5 and records[-1]["again"]
    assert records[-1]["guidance_interval"] == [0.1, 0.8] and "guidance_interval" not in records[0]
    assert (
        records[-1]["n"]["class"] == 8 and "class:" in again.stdout and "judge on held-out real clips" in again.stdout
    )
    assert (
        "evaluated again" in again.stdout and "guidance 1.5 over noise levels 0.1-0.8, 2 sampling steps" in again.stdout
    )
    assert "fewer than the judge's 128 features" in again.stdout  # 8 clips x 3 frames: the FD is said to be unreliable
    samples = tmp_path / "run" / "samples"  # training's sheet is kept beside the new one
    assert (samples / "step-0000002.png").is_file() and (
        samples / "step-0000002-again-n8-g1.5-i0.1-0.8-s2.png"
    ).is_file()
    assert "score" not in records[-1]  # never one blended number
    # a run that saved no pipeline is refused by name, before anything loads
    missing = subprocess.run(
        args[:3] + ["evaluate", "--set", f"run_dir={tmp_path / 'none'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "no saved pipeline in" in missing.stderr
    negative = subprocess.run(
        args[:3] + ["evaluate"] + args[3:] + ["--set", "eval_guidance=-1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert negative.returncode == 2 and "eval_guidance" in negative.stderr
    backwards = subprocess.run(
        args[:3] + ["evaluate"] + args[3:] + ["--set", "eval_guidance_interval=[0.8,0.1]"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert backwards.returncode == 2 and "eval_guidance_interval" in backwards.stderr
