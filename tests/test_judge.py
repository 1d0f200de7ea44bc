"""The judge of generated glyph clips: validated on held-out real clips before it scores a model."""

import numpy as np
import pytest
import torch

from train import judge
from train.evaluate import alignment_prompts, format_eval


@pytest.fixture(scope="module")
def digits_judge():
    return judge.make_judge("digits", (5, 32, 32), n=200, log=lambda *_: None)


def test_the_judge_reads_held_out_real_clips(digits_judge):
    """The issue's bar for the evaluator: >= 95 % class and direction on real clips no run trains on."""
    validity = digits_judge.validity
    assert validity["class"].n == 200 and validity["class"].value >= 0.95, str(validity["class"])
    assert validity["motion"].value >= 0.95, str(validity["motion"])
    assert validity["class"].chance == 0.1 and validity["motion"].chance == 0.125


def test_frechet_floor_and_a_wrong_distribution(digits_judge):
    fd, floor = digits_judge.frechet(digits_judge.floor_features)
    assert fd == floor and 0 < floor < 10  # two real sets: only the estimator's noise
    blank = torch.full((40, 3, 5, 32, 32), -1.0)
    noise = torch.rand(40, 3, 5, 32, 32) * 2 - 1
    for fake in (blank + 0.01 * torch.randn_like(blank), noise):
        wrong, floor = digits_judge.frechet(judge.read(digits_judge.classifier, fake).features)
        assert wrong > 10 * floor


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20_000, 3))
    assert judge.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    b = rng.normal(size=(20_000, 3)) * 2 + np.array([1.0, 0, 0])  # mean shift 1, sd 2: 1 + 3 * (1 - 2)^2
    assert judge.frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)


def test_wilson_interval():
    low, high = judge.wilson(9, 10)
    assert low == pytest.approx(0.596, abs=1e-3) and high == pytest.approx(0.982, abs=1e-3)
    assert judge.wilson(0, 20)[0] == 0 and judge.wilson(20, 20)[1] == 1
    assert str(judge.Accuracy(72, 80, 0.125)).startswith("90.0% [81%, 95%] (chance 12.5%")


def test_prompts_are_balanced_and_canonical():
    prompts = alignment_prompts(80, frames=5, data_kind="digits")
    assert sorted((p["label"], p["motion"]) for p in prompts) == sorted(
        (c, m) for c in range(10) for m in judge.COMPASS
    )  # each (digit, direction) once
    assert [p["label"] for p in prompts] == sorted(p["label"] for p in prompts)  # a row per digit
    assert judge.caption("digits", prompts[0]).startswith("the digit 0 moving")
    images = alignment_prompts(20, frames=1, data_kind="fashion")
    assert sorted(p["label"] for p in images) == [c for c in range(10) for _ in range(2)]
    assert {p["motion"] for p in images} == {"static"} and judge.caption("fashion", images[0]) == "a t-shirt"


def test_real_clips_score_high_and_shuffled_prompts_score_at_chance(digits_judge):
    """The score itself: real clips of the prompts read right; the same clips against shuffled
    prompts (a model that ignores its text) read near chance."""
    data = judge.glyph_clips("digits", 80, 4242, "val", (5, 32, 32))
    clips = [data[i] for i in range(80)]
    reading = judge.read(digits_judge.classifier, torch.stack([c.video for c in clips]))
    truth = [c.attrs for c in clips]
    right = judge.score(reading, truth)
    assert right["class"].value >= 0.9 and right["motion"].value >= 0.95
    shuffled = judge.score(reading, truth[1:] + truth[:1])
    assert shuffled["class"].value < 0.35 and shuffled["motion"].value < 0.4


def test_format_eval_states_each_attribute_beside_chance():
    text = format_eval(
        {
            "step": 7,
            "val_loss": 0.1,
            "val_loss_se": 0.01,
            "val_clips": 8,
            "accuracy": {"class": 0.9, "motion": 0.85},
            "interval": {"class": [0.81, 0.95], "motion": [0.75, 0.91]},
            "chance": {"class": 0.1, "motion": 0.125},
            "n": {"class": 80, "motion": 80},
            "fd": 3.2,
            "fd_floor": 1.1,
            "judge": {"class": 0.975, "motion": 1.0},
            "samples": "run/samples/s.png",
        }
    )
    assert "class: 90.0% [81%, 95%] of 80 samples (chance 10.0%)" in text
    assert "Frechet distance to real clips: 3.20 (real vs real: 1.10)" in text
    assert "judge on held-out real clips: class 97.5%, motion 100.0%" in text and "run/samples/s.gif" in text
