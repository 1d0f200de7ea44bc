"""`ministack sample` end to end: files written, sizes, errors; and the tiny VAE trains."""

import subprocess
import sys
from pathlib import Path

import torch

from model.media import read_frames
from model.pipeline import MiniStackPipeline
from model.vae import load_codec

ROOT = Path(__file__).resolve().parents[1]


def sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ministack", "sample", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_sample_writes_mp4_gif_and_grid(tmp_path):
    MiniStackPipeline.build(config="tiny", codec="tiny").save_pretrained(tmp_path / "pipe")
    stem = tmp_path / "out" / "clip"
    proc = sample(
        "--pipeline",
        str(tmp_path / "pipe"),
        "--prompt",
        "a red square",
        "--frames",
        "5",
        "--height",
        "16",
        "--width",
        "24",
        "--steps",
        "2",
        "--out",
        str(stem),
    )
    assert proc.returncode == 0, proc.stderr
    assert read_frames(stem.with_suffix(".mp4")).shape == (5, 16, 24, 3)
    assert read_frames(stem.with_suffix(".gif")).shape == (5, 16, 24, 3)
    assert read_frames(stem.with_suffix(".png")).shape == (1, 16, 5 * 24, 3)  # one row, every frame
    proc = sample(
        "--pipeline",
        str(tmp_path / "pipe"),
        "--prompt",
        "x",
        "--video",
        str(stem.with_suffix(".mp4")),
        "--extend",
        "forward",
        "--frames",
        "9",
        "--height",
        "16",
        "--width",
        "24",
        "--steps",
        "2",
        "--num",
        "2",
        "--out",
        str(tmp_path / "ext"),
    )
    assert proc.returncode == 0, proc.stderr
    assert read_frames(tmp_path / "ext-1.mp4").shape == (9, 16, 24, 3)


def test_sample_bad_input_is_a_clear_error(tmp_path):
    proc = sample("--pipeline", str(tmp_path), "--prompt", "x")
    assert proc.returncode == 2 and "not a saved ministack pipeline" in proc.stderr and "Traceback" not in proc.stderr
    assert f"--pipeline {tmp_path} is not a saved" in proc.stderr  # the flag named
    missing = sample("--pipeline", str(tmp_path / "none"), "--prompt", "x")
    assert missing.returncode == 2 and f"--pipeline {tmp_path / 'none'}: no such directory" in missing.stderr


def test_tiny_vae_trains_from_scratch():
    """The tiny causal VAE learns to reconstruct: its loss falls within a few dozen steps on CPU."""
    torch.manual_seed(0)
    codec = load_codec("tiny")
    vae = codec.vae.requires_grad_(True).train()
    coarse = torch.rand(2, 3, 5, 4, 4) * 2 - 1  # smooth content a 16x-smaller latent can hold
    clip = torch.nn.functional.interpolate(coarse, size=(5, 16, 16), mode="trilinear")
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = (codec.decode(codec.encode(clip)) - clip).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.5 * losses[0]
