"""Evaluation: a validation loss that does not move between calls, and alignment scoring with chance."""

import pytest
import torch

from model.pipeline import MiniStackPipeline
from train.data.procedural import ProceduralVideos
from train.evaluate import Sampler, alignment_prompts, text_alignment, validation_loss, validation_losses
from train.probe import alignment_score


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return MiniStackPipeline.build(config="tiny", codec="identity")


def test_validation_loss_is_fixed_and_sensitive_to_the_weights(pipe):
    data = ProceduralVideos(16, seed=123, resolutions=((16, 16),), frames=(3,))
    clips = [data[i] for i in range(4)]
    a = validation_loss(pipe.transformer, pipe.codec, pipe.text_encoder, clips, "flow")
    assert a == validation_loss(pipe.transformer, pipe.codec, pipe.text_encoder, clips, "flow") and a > 0
    with torch.no_grad():
        pipe.transformer.final_layer.linear.weight.add_(0.1)
    assert validation_loss(pipe.transformer, pipe.codec, pipe.text_encoder, clips, "flow") != a
    with torch.no_grad():
        pipe.transformer.final_layer.linear.weight.sub_(0.1)


def test_validation_losses_per_clip_do_not_depend_on_the_batching(pipe):
    data = ProceduralVideos(16, seed=7, resolutions=((16, 16),), frames=(3,))
    clips = [data[i] for i in range(5)]
    whole = validation_losses(pipe.transformer, pipe.codec, pipe.text_encoder, clips, "flow")
    split = validation_losses(pipe.transformer, pipe.codec, pipe.text_encoder, clips, "flow", batch=2)
    assert whole.shape == (5,) and len(set(whole.tolist())) == 5  # each clip its own loss
    assert torch.allclose(torch.from_numpy(whole), torch.from_numpy(split), rtol=1e-5)
    assert whole.mean() == pytest.approx(
        validation_loss(pipe.transformer, pipe.codec, pipe.text_encoder, clips, "flow")
    )


def test_alignment_prompts_and_scoring(pipe, tmp_path):
    attrs = alignment_prompts(6, frames=5, seed=1)
    assert len(attrs) == 6 and all(a["motion"] in ("left", "right", "up", "down") for a in attrs)
    assert all(a["motion"] == "static" for a in alignment_prompts(3, frames=1))
    result = text_alignment(
        pipe, n=4, frames=5, height=16, width=16, sampler=Sampler(steps=2), grid_path=tmp_path / "grid.png"
    )
    assert (tmp_path / "grid.png").is_file() and len(result["prompts"]) == 4
    assert 0 <= result["score"] <= 1 and 0 < result["score_chance"] < 1
    # the scorer itself: real clips of the prompts score far above chance
    data = ProceduralVideos(8, seed=5, resolutions=((32, 32),), frames=(9,))
    truth = [data.describe(i)[0] for i in range(8)]
    scored = alignment_score([data[i].video for i in range(8)], truth)
    assert scored["score"] > scored["score_chance"] + 0.5
