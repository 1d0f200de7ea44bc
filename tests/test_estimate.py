"""`ministack flops estimate`: hand-checked plans, token counting, parsing, and error messages."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from profiling import estimate, laws
from profiling.hardware import accelerator

ROOT = Path(__file__).resolve().parents[1]
H100_BF16 = 989.4e12  # H100-SXM dense bf16
A100_BF16 = 312e12
GPT3 = ["--params", "175B", "--tokens", "300e9", "--gpu", "h100-sxm", "--mfu", "0.4", "--num-gpus", "1024"]


def plan(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    estimate.add_arguments(parser)
    return estimate.plan(parser.parse_args(argv))


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "profiling", "estimate", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


# --- hand-computed plans -------------------------------------------------------------------

def test_gpt3_training_by_hand():
    # 6 * 175e9 * 300e9 = 3.15e23 FLOPs; / (989.4e12 * 0.4) = 7.959e8 GPU-s = 9212 GPU-days;
    # / 1024 GPUs = 8.996 days.
    assert accelerator("H100-SXM").peak("bf16") == H100_BF16
    p = estimate.training(175e9, 300e9, H100_BF16, 0.4, 1024)
    assert p["train_flops"] == pytest.approx(3.15e23)
    assert p["gpu_seconds"] == pytest.approx(7.959e8, rel=1e-3)
    assert p["gpu_days"] == pytest.approx(9212.2, rel=1e-4)
    assert p["wall_days"] == pytest.approx(8.996, rel=1e-3)


def test_serving_by_hand():
    # 7B model, 1000 prompt + 500 answer tokens: 2 * 7e9 * 1500 = 2.1e13 FLOPs per request.
    # A100 bf16 312e12 at 30% = 9.36e13 FLOP/s -> 0.22436 s/request -> 4.457 requests/s.
    # 1e6 requests/day in 8 busy hours: 1e6 * 0.22436 s = 224,359 GPU-s / 28,800 s = 7.79 -> 8 GPUs.
    p = estimate.serving(7e9, 1000, 500, 1e6, A100_BF16, 0.3, hours_per_day=8)
    assert p["flops_per_request"] == pytest.approx(2.1e13)
    assert p["seconds_per_request"] == pytest.approx(0.224359, rel=1e-5)
    assert p["requests_per_second_per_gpu"] == pytest.approx(4.4571, rel=1e-4)
    assert p["gpus_needed"] == 8


def test_serving_exact_load_is_not_rounded_up():
    # 2 * 1e9 * 250 = 5e11 FLOPs at 1e12 * 0.5 FLOP/s = exactly 1 s; 3 days of seconds -> 3 GPUs.
    assert estimate.serving(1e9, 200, 50, 3 * 86400, 1e12, 0.5)["gpus_needed"] == 3
    assert estimate.serving(1e9, 200, 50, 3 * 86400 + 1, 1e12, 0.5)["gpus_needed"] == 4


def test_fractions_and_hours_are_validated():
    with pytest.raises(ValueError, match="--mfu .* got 40"):
        estimate.training(1e9, 1e9, H100_BF16, 40)
    with pytest.raises(ValueError, match="--utilization"):
        estimate.serving(1e9, 1, 1, 1, H100_BF16, 1.5)
    with pytest.raises(ValueError, match="--hours-per-day"):
        estimate.serving(1e9, 1, 1, 1, H100_BF16, 0.5, hours_per_day=25)


# --- attention (--layers, --d-attn) ----------------------------------------------------------

TINY = ("--params", "1000", "--layers", "2", "--d-attn", "4", "--gpu", "A100")
TINY_IMAGES = (*TINY, "--images", "10", "--resolution", "8x8", "--patch", "2", "--mfu", "0.5")


def test_training_attention_on_a_tiny_image_dataset():
    # 8x8 images, patch 2 -> 4*4 = 16 tokens each = S; 10 images -> D = 160 tokens.
    # 6ND = 6 * 1000 * 160 = 960,000.
    # PaLM attention: 12 * L * d_attn * S per token = 12 * 2 * 4 * 16 = 1,536; x 160 tokens = 245,760.
    # total 1,205,760; share 245,760 / 1,205,760 = 0.20382.
    p = plan(*TINY_IMAGES)
    assert p["tokens_per_image"] == 16 and p["tokens"] == 160
    assert p["train_flops"] == 960_000
    assert p["train_flops_with_attention"] == 1_205_760
    assert p["attention_share"] == pytest.approx(245_760 / 1_205_760)
    # the same as laws.palm_train_flops_per_token (H * Q = d_attn) times the tokens
    assert p["train_flops_with_attention"] == laws.palm_train_flops_per_token(1000, 2, 1, 4, 16) * 160
    # times use the figure with attention
    assert p["gpu_seconds"] == pytest.approx(1_205_760 / (A100_BF16 * 0.5))
    assert p["layers"] == 2 and p["d_attn"] == 4 and "seq_len" not in p


def test_training_attention_sums_per_kind_and_epoch():
    # images: 8x8 / patch 2 = 16 tokens (S = 16); videos: 4 frames x 16 = 64 tokens (S = 64).
    # One epoch: 10 * 16 = 160 image tokens + 2 * 64 = 128 video tokens = 288; 2 epochs = 576.
    # Attention: 12 * 2 * 4 * (160 * 16 + 128 * 64) * 2 epochs = 96 * (2,560 + 8,192) * 2 = 2,064,384
    # (a single S for all 288 tokens would be wrong either way).
    p = plan(*TINY_IMAGES, "--videos", "2", "--frames", "4", "--epochs", "2")
    assert p["tokens"] == 576 and p["train_flops"] == 6 * 1000 * 576
    assert p["train_flops_with_attention"] - p["train_flops"] == 2_064_384


def test_training_attention_with_tokens_needs_seq_len():
    # 1000 tokens attending over 10: 12 * 2 * 4 * 10 * 1000 = 960,000 on top of 6 * 1000 * 1000.
    p = plan(*TINY, "--tokens", "1000", "--seq-len", "10", "--mfu", "0.5")
    assert p["seq_len"] == 10 and p["train_flops_with_attention"] == 6_000_000 + 960_000
    with pytest.raises(ValueError) as err:
        plan(*TINY, "--tokens", "1000", "--mfu", "0.5")
    assert str(err.value) == ("training estimate needs: "
                              "--seq-len (tokens each token attends over, for --layers/--d-attn)")
    with pytest.raises(ValueError, match="--seq-len .* goes with --tokens"):
        plan(*TINY_IMAGES, "--seq-len", "10")
    with pytest.raises(ValueError, match="--seq-len .* --layers and --d-attn"):
        plan("--params", "1000", "--tokens", "1000", "--seq-len", "10", "--gpu", "A100", "--mfu", "0.5")


def test_serving_attention_by_hand():
    # P = 3, A = 1: T = 4 tokens; causal pairs = 1 + 2 + 3 + 4 = 10 (each sees itself and earlier ones).
    # attention = 4 * L * d_attn * pairs = 4 * 2 * 4 * 10 = 320; 2NT = 2 * 1000 * 4 = 8,000; total 8,320.
    # At 1e4 FLOP/s x 0.5: law 1.6 s, with attention 1.664 s per request. 52,000 requests in 86,400 s:
    # law 52,000 * 1.6 / 86,400 = 0.963 -> 1 GPU; with attention * 1.664 = 1.0015 -> 2 GPUs.
    assert estimate.request_attention_flops(2, 4, 4) == (320, 10)
    law = estimate.serving(1000, 3, 1, 52_000, 1e4, 0.5)
    p = estimate.serving(1000, 3, 1, 52_000, 1e4, 0.5, attention=(2, 4))
    assert law["gpus_needed"] == 1 and "flops_per_request_with_attention" not in law
    assert p["flops_per_request"] == 8_000 and p["flops_per_request_with_attention"] == 8_320
    assert p["attention_pairs_per_request"] == 10
    assert p["seconds_per_request"] == pytest.approx(1.664) and p["gpus_needed"] == 2


@pytest.mark.parametrize("tokens", [1, 4, 8500])
def test_serving_attention_is_kaplans_term_plus_the_diagonal(tokens):
    # Kaplan's 2 * L * n_ctx * d_attn per token over a T-token request: 2 * L * d * T^2. The exact
    # causal count 4 * L * d * T(T+1)/2 = 2 * L * d * T(T+1) adds the diagonal: 2 * L * d * T.
    kaplan = laws.kaplan_forward_flops_per_token(0, 30, tokens, 576) * tokens
    assert estimate.request_attention_flops(30, 576, tokens)[0] - kaplan == 2 * 30 * 576 * tokens


def test_layers_and_d_attn_come_together():
    with pytest.raises(ValueError, match=r"^--layers needs --d-attn"):
        plan("--params", "1000", "--layers", "2", "--tokens", "1000", "--gpu", "A100", "--mfu", "0.5")
    with pytest.raises(ValueError, match=r"^--d-attn needs --layers"):
        plan("--params", "1000", "--d-attn", "4", "--prompt-tokens", "3")


# --- token counting ------------------------------------------------------------------------

def test_image_tokens():
    assert estimate.tokens_per_sample(1, 256, 256, (1, 2, 2), (1, 8, 8)) == 256  # (256/8/2)^2
    assert estimate.tokens_per_sample(1, 224, 224, (1, 16, 16)) == 196  # H*W/P^2, no compression
    assert estimate.tokens_per_sample(1, 256, 256, (2, 2, 2), (4, 8, 8)) == 256  # one frame stays one
    d = estimate.dataset_tokens((256, 256), (1, 2, 2), (1, 8, 8), images=1e6)
    assert d["tokens_per_image"] == 256 and d["tokens_per_epoch"] == 2.56e8


def test_video_tokens():
    # (96/4/1) * (256/8/2) * (256/8/2) = 24 * 16 * 16
    assert estimate.tokens_per_sample(96, 256, 256, (1, 2, 2), (4, 8, 8)) == 6144
    d = estimate.dataset_tokens((256, 256), (1, 2, 2), (4, 8, 8), images=10, videos=1000, frames=96)
    assert d["tokens_per_video"] == 6144 and d["tokens_per_image"] == 256
    assert d["tokens_per_epoch"] == 1000 * 6144 + 10 * 256


def test_ceil_division_pads_partial_patches():
    assert estimate.tokens_per_sample(1, 250, 250, (1, 2, 2), (1, 8, 8)) == 16 * 16  # 250/16 = 15.6
    assert estimate.tokens_per_sample(97, 256, 256, (1, 2, 2), (4, 8, 8)) == 25 * 256  # 97/4 = 24.25
    assert estimate.tokens_per_sample(5, 3, 7, (2, 1, 2)) == 3 * 3 * 4


def test_fps_times_duration_and_epochs():
    p = plan("--params", "1B", "--videos", "1000", "--fps", "24", "--duration", "4", "--resolution", "256x256",
             "--patch", "1,2,2", "--latent-compression", "4,8,8", "--epochs", "3", "--gpu", "A100", "--mfu", "0.5")
    assert p["frames"] == 96 and p["tokens_per_video"] == 6144
    assert p["tokens"] == 3 * 1000 * 6144
    assert p["train_flops"] == pytest.approx(6 * 1e9 * 3 * 6144e3)
    # --frames wins over fps x duration
    assert plan("--params", "1B", "--videos", "1", "--frames", "16", "--fps", "24", "--duration", "4",
                "--resolution", "64x64", "--patch", "2", "--gpu", "A100", "--mfu", "0.5")["tokens"] == 16 * 32 * 32


# --- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("175e9", 175e9), ("1.5e12", 1.5e12), ("7B", 7e9), ("135m", 135e6),
                                         ("2T", 2e12), ("10k", 1e4), (" 0.4 ", 0.4), ("96", 96.0)])
def test_parse_number(text, value):
    assert estimate.parse_number(text) == value


@pytest.mark.parametrize("text", ["abc", "7X", "-1", "0", "nan", "inf", "B", ""])
def test_parse_number_rejects(text):
    with pytest.raises(ValueError, match="positive number"):
        estimate.parse_number(text)


@pytest.mark.parametrize("text, value", [("64", 64), ("8k", 8000), ("1.1k", 1100), ("7B", 7_000_000_000)])
def test_parse_count(text, value):
    assert estimate.parse_count(text) == value and isinstance(estimate.parse_count(text), int)


@pytest.mark.parametrize("text", ["0.5", "1.5", "2.5k0"])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError, match="whole number|positive number"):
        estimate.parse_count(text)


def test_parse_shapes():
    assert estimate.parse_resolution("256x128") == (256, 128)
    assert estimate.parse_patch("2") == (1, 2, 2)
    assert estimate.parse_patch("2,4,4") == (2, 4, 4)
    assert estimate.parse_compression("4,8,8") == (4, 8, 8)
    for parse, bad in ((estimate.parse_resolution, "256"), (estimate.parse_resolution, "0x8"),
                       (estimate.parse_patch, "1,2"), (estimate.parse_compression, "8"),
                       (estimate.parse_compression, "4,a,8")):
        with pytest.raises(ValueError, match="expected"):
            parse(bad)


def test_cpu_uses_the_measured_peak(monkeypatch):
    import profiling.cpu

    monkeypatch.setattr(profiling.cpu, "cpu_peak_flops", lambda dtype: {"bf16": 2e12}[dtype])
    monkeypatch.setattr(profiling.cpu, "cpu_name", lambda: "test cpu")
    assert estimate.peak_flops("cpu", "bfloat16") == ("test cpu", 2e12)
    assert estimate.peak_flops("h100") == ("H100-SXM", H100_BF16)


# --- missing and contradictory inputs ------------------------------------------------------

def test_missing_training_inputs_are_all_named():
    with pytest.raises(ValueError) as err:
        plan("--params", "7B", "--tokens", "1T")
    assert str(err.value) == "training estimate needs: --gpu, --mfu"
    with pytest.raises(ValueError) as err:
        plan("--videos", "10", "--resolution", "256x256", "--fps", "24")
    assert str(err.value) == "training estimate needs: --params, --patch, --duration, --gpu, --mfu"
    with pytest.raises(ValueError) as err:
        plan("--mfu", "0.4")
    assert str(err.value) == "training estimate needs: --params, --tokens (or --images/--videos), --gpu"
    with pytest.raises(ValueError, match=r"--frames \(or --fps and --duration\)"):
        plan("--params", "1B", "--videos", "10", "--resolution", "8x8", "--patch", "2", "--gpu", "L4", "--mfu", ".3")


def test_missing_serving_and_both():
    with pytest.raises(ValueError) as err:
        plan("--prompt-tokens", "100")
    assert str(err.value) == ("serving estimate needs: --params, --answer-tokens, --requests-per-day, "
                              "--gpu, --utilization")
    with pytest.raises(ValueError) as err:
        plan("--params", "7B", "--tokens", "1T", "--requests-per-day", "1M", "--gpu", "A100")
    assert str(err.value) == ("training estimate needs: --mfu; serving estimate needs: "
                              "--prompt-tokens, --answer-tokens, --utilization")


def test_nothing_actionable_says_what_each_mode_needs():
    for argv in ((), ("--params", "7B", "--gpu", "H100")):
        with pytest.raises(ValueError, match="nothing to estimate") as err:
            plan(*argv)
        assert "--tokens" in str(err.value) and "--mfu" in str(err.value)
        assert "--requests-per-day" in str(err.value) and "--utilization" in str(err.value)


def test_contradictions():
    with pytest.raises(ValueError, match="--tokens or a dataset"):
        plan("--params", "1B", "--tokens", "1T", "--images", "5")
    with pytest.raises(ValueError, match="--resolution.*need --images or --videos"):
        plan("--params", "1B", "--tokens", "1T", "--resolution", "8x8")
    with pytest.raises(ValueError, match="--fps.*need --videos"):
        plan("--params", "1B", "--images", "5", "--resolution", "8x8", "--patch", "2", "--fps", "24")
    with pytest.raises(ValueError, match="T4 has no bf16 peak"):
        plan("--params", "1B", "--tokens", "1T", "--gpu", "T4", "--mfu", "0.4")


# --- the command line end to end -----------------------------------------------------------

def test_cli_json_gpt3_and_serving():
    out = cli(*GPT3, "--prompt-tokens", "1000", "--answer-tokens", "500", "--requests-per-day", "1M",
              "--hours-per-day", "8", "--utilization", "0.3", "--json")
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert p["gpu"] == "H100-SXM" and p["dtype"] == "bf16" and p["peak_flops"] == H100_BF16
    assert p["params"] == 175e9 and p["tokens"] == 300e9
    assert p["train_flops"] == pytest.approx(3.15e23)
    assert p["gpu_days"] == pytest.approx(9212.2, rel=1e-4)
    assert p["wall_days"] == pytest.approx(8.996, rel=1e-3)
    assert p["flops_per_request"] == pytest.approx(2 * 175e9 * 1500)
    assert p["seconds_per_request"] == pytest.approx(2 * 175e9 * 1500 / (H100_BF16 * 0.3))
    # 5.25e14 FLOPs / 2.9682e14 FLOP/s = 1.7688 s; 1e6 requests * 1.7688 s / 28,800 s = 61.4 -> 62
    assert p["gpus_needed"] == 62
    # counts print as integers, not 1024.0
    assert '"num_gpus": 1024,' in out.stdout and '"params": 175000000000,' in out.stdout
    for key in ("num_gpus", "params", "tokens", "prompt_tokens", "answer_tokens", "requests_per_day"):
        assert type(p[key]) is int, key
    assert "train_flops_with_attention" not in p and "flops_per_request_with_attention" not in p


def test_cli_json_with_attention():
    # Training as in test_training_attention_on_a_tiny_image_dataset, serving as in
    # test_serving_attention_by_hand (P = 3, A = 1: 10 pairs, 320 attention FLOPs), on an A100.
    out = cli(*TINY_IMAGES, "--prompt-tokens", "3", "--answer-tokens", "1", "--requests-per-day", "52000",
              "--utilization", "0.5", "--num-gpus", "4", "--json")
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert p["layers"] == 2 and p["d_attn"] == 4 and p["num_gpus"] == 4 and p["images"] == 10
    assert p["train_flops"] == 960_000 and p["train_flops_with_attention"] == 1_205_760
    assert p["attention_share"] == pytest.approx(0.203822, rel=1e-5)
    assert p["wall_days"] == pytest.approx(1_205_760 / (A100_BF16 * 0.5) / 86400 / 4)
    assert p["flops_per_request"] == 8_000 and p["flops_per_request_with_attention"] == 8_320
    assert p["attention_pairs_per_request"] == 10
    assert p["seconds_per_request"] == pytest.approx(8_320 / (A100_BF16 * 0.5))


def test_cli_human_table_with_attention_says_which_figure_it_uses():
    out = cli(*TINY_IMAGES, "--prompt-tokens", "3", "--answer-tokens", "1", "--requests-per-day", "1",
              "--utilization", "0.5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split() == ["compute", "(6ND)", "9.600e+05", "FLOPs"] for line in lines)
    assert "compute (6ND + attention) 1.206e+06 FLOPs (20.4% attention), used below" in out.stdout
    assert "12 x 2 layers x d_attn 4 x S per token" in out.stdout and "S = tokens per sample" in out.stdout
    assert "compute (2NT + attention) 8.320e+03 FLOPs per request (3.8% attention), used below" in out.stdout
    assert "4 x 2 layers x d_attn 4 x 10 causal (query, key) pairs" in out.stdout


def test_cli_json_image_dataset():
    out = cli("--params", "675M", "--images", "1e6", "--resolution", "256x256", "--patch", "2",
              "--latent-compression", "1,8,8", "--gpu", "A100", "--mfu", "0.5", "--json")
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert p["tokens_per_image"] == 256 and p["tokens"] == 2.56e8
    assert p["gpu_days"] == pytest.approx(6 * 675e6 * 2.56e8 / (A100_BF16 * 0.5) / 86400)


def test_cli_human_table():
    out = cli(*GPT3)
    assert out.returncode == 0, out.stderr
    assert "3.150e+23 FLOPs" in out.stdout
    assert "9,212 GPU-days" in out.stdout
    assert "8.996 days on 1,024 GPUs" in out.stdout


def test_cli_missing_input_is_one_error_line():
    out = cli("--params", "7B", "--tokens", "1T")
    assert out.returncode == 2
    assert out.stderr.strip() == "ministack flops estimate: error: training estimate needs: --gpu, --mfu"
