"""`ministack flops estimate`: hand-checked plans, each figure from its minimal inputs, token
counting, parsing, and error messages."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from profiling import estimate, inputs, laws
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
    return subprocess.run(
        [sys.executable, "-m", "model.flops", "estimate", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


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
    # without --seq-len: 6ND only; what uses attention (and so the times) is missing --seq-len
    p = plan(*TINY, "--tokens", "1000", "--mfu", "0.5")
    seq_len = "--seq-len (tokens each token attends over, for --layers/--d-attn)"
    assert p["train_flops"] == 6_000_000 and "train_flops_with_attention" not in p and "gpu_days" not in p
    assert p["missing"] == {
        "train_flops_with_attention": [seq_len],
        "gpu_days": [seq_len],
        "wall_days": [seq_len, "--num-gpus"],
    }
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
    assert inputs.tokens_per_sample(1, 256, 256, (1, 2, 2), (1, 8, 8)) == 256  # (256/8/2)^2
    assert inputs.tokens_per_sample(1, 224, 224, (1, 16, 16)) == 196  # H*W/P^2, no compression
    assert inputs.tokens_per_sample(1, 256, 256, (2, 2, 2), (4, 8, 8)) == 256  # one frame stays one
    d = inputs.dataset_tokens((256, 256), (1, 2, 2), (1, 8, 8), images=1e6)
    assert d["tokens_per_image"] == 256 and d["tokens_per_epoch"] == 2.56e8


def test_video_tokens():
    # (96/4/1) * (256/8/2) * (256/8/2) = 24 * 16 * 16
    assert inputs.tokens_per_sample(96, 256, 256, (1, 2, 2), (4, 8, 8)) == 6144
    d = inputs.dataset_tokens((256, 256), (1, 2, 2), (4, 8, 8), images=10, videos=1000, frames=96)
    assert d["tokens_per_video"] == 6144 and d["tokens_per_image"] == 256
    assert d["tokens_per_epoch"] == 1000 * 6144 + 10 * 256


def test_ceil_division_pads_partial_patches():
    assert inputs.tokens_per_sample(1, 250, 250, (1, 2, 2), (1, 8, 8)) == 16 * 16  # 250/16 = 15.6
    assert inputs.tokens_per_sample(97, 256, 256, (1, 2, 2), (4, 8, 8)) == 25 * 256  # 97/4 = 24.25
    assert inputs.tokens_per_sample(5, 3, 7, (2, 1, 2)) == 3 * 3 * 4


def test_fps_times_duration_and_epochs():
    p = plan(
        "--params",
        "1B",
        "--videos",
        "1000",
        "--fps",
        "24",
        "--duration",
        "4",
        "--resolution",
        "256x256",
        "--patch",
        "1,2,2",
        "--latent-compression",
        "4,8,8",
        "--epochs",
        "3",
        "--gpu",
        "A100",
        "--mfu",
        "0.5",
    )
    assert p["frames"] == 96 and p["tokens_per_video"] == 6144
    assert p["tokens"] == 3 * 1000 * 6144
    assert p["train_flops"] == pytest.approx(6 * 1e9 * 3 * 6144e3)
    # --frames wins over fps x duration
    assert (
        plan(
            "--params",
            "1B",
            "--videos",
            "1",
            "--frames",
            "16",
            "--fps",
            "24",
            "--duration",
            "4",
            "--resolution",
            "64x64",
            "--patch",
            "2",
            "--gpu",
            "A100",
            "--mfu",
            "0.5",
        )["tokens"]
        == 16 * 32 * 32
    )


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("175e9", 175e9),
        ("1.5e12", 1.5e12),
        ("7B", 7e9),
        ("135m", 135e6),
        ("2T", 2e12),
        ("10k", 1e4),
        ("400G", 4e11),
        (" 0.4 ", 0.4),
        ("96", 96.0),
    ],
)
def test_parse_number(text, value):
    assert inputs.parse_number(text) == value


@pytest.mark.parametrize("text", ["abc", "7X", "-1", "0", "nan", "inf", "B", ""])
def test_parse_number_rejects(text):
    with pytest.raises(ValueError, match="positive number"):
        inputs.parse_number(text)


@pytest.mark.parametrize("text, value", [("64", 64), ("8k", 8000), ("1.1k", 1100), ("7B", 7_000_000_000)])
def test_parse_count(text, value):
    assert inputs.parse_count(text) == value and isinstance(inputs.parse_count(text), int)


@pytest.mark.parametrize("text", ["0.5", "1.5", "2.5k0"])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError, match="whole number|positive number"):
        inputs.parse_count(text)


def test_parse_shapes():
    assert inputs.parse_resolution("256x128") == (256, 128)
    assert inputs.parse_patch("2") == (1, 2, 2)
    assert inputs.parse_patch("2,4,4") == (2, 4, 4)
    assert inputs.parse_compression("4,8,8") == (4, 8, 8)
    for parse, bad in (
        (inputs.parse_resolution, "256"),
        (inputs.parse_resolution, "0x8"),
        (inputs.parse_patch, "1,2"),
        (inputs.parse_compression, "8"),
        (inputs.parse_compression, "4,a,8"),
    ):
        with pytest.raises(ValueError, match="expected"):
            parse(bad)


def test_cpu_uses_the_measured_peak(monkeypatch):
    import profiling.cpu

    monkeypatch.setattr(profiling.cpu, "cpu_peak_flops", lambda dtype: {"bf16": 2e12, "fp32": 1e12}[dtype])
    monkeypatch.setattr(profiling.cpu, "cpu_name", lambda: "test cpu")
    monkeypatch.setattr(profiling.cpu, "preferred_cpu_dtype", lambda: "fp32")
    assert estimate.peak_flops("cpu", "bfloat16") == {"gpu": "test cpu", "dtype": "bf16", "peak_flops": 2e12}
    # no --dtype: the dtype this CPU prefers
    assert estimate.peak_flops("cpu") == {"gpu": "test cpu", "dtype": "fp32", "peak_flops": 1e12}
    assert estimate.peak_flops("h100") == {"gpu": "H100-SXM", "dtype": "bf16", "peak_flops": H100_BF16}


# --- each figure from the inputs it needs -----------------------------------------------------

FIGURES = set(estimate.LABELS)  # tokens, train_flops, ..., gpus_needed: the figure keys of --json
GPT3_DATA = ("--params", "175e9", "--tokens", "300e9")
GPT3_REQUEST = ("--params", "175e9", "--prompt-tokens", "20", "--answer-tokens", "300")
IMAGES = ("--images", "6e9", "--resolution", "1024x1980", "--patch", "16")


def test_tokens_from_a_dataset_alone():
    # ceil(1024/16) * ceil(1980/16) = 64 * 124 = 7,936 tokens per image; x 6e9 images = 4.7616e13.
    p = plan(*IMAGES)
    assert p["tokens_per_image"] == 7936 and p["tokens"] == 47_616_000_000_000
    assert p.keys() & FIGURES == {"tokens"} and "gpu" not in p and "params" not in p
    assert p["missing"] == {
        "train_flops": ["--params"],
        "gpu_days": ["--params", "--gpu", "--mfu"],
        "wall_days": ["--params", "--gpu", "--mfu", "--num-gpus"],
    }


def test_train_flops_from_params_and_tokens_alone():
    # GPT-3: 6 * 175e9 * 300e9 = 3.15e23 FLOPs; serving was not asked about, so is not listed
    p = plan(*GPT3_DATA)
    assert p["train_flops"] == pytest.approx(3.15e23)
    assert p.keys() & FIGURES == {"tokens", "train_flops"} and "gpu" not in p and "mfu" not in p
    assert p["missing"] == {"gpu_days": ["--gpu", "--mfu"], "wall_days": ["--gpu", "--mfu", "--num-gpus"]}


def test_gpu_days_add_a_gpu_and_an_mfu():
    # 3.15e23 / (989.4e12 * 0.4) = 7.959e8 GPU-s / 86,400 = 9,212 GPU-days
    p = plan(*GPT3_DATA, "--gpu", "h100", "--mfu", "0.4")
    assert p["gpu_days"] == pytest.approx(9212.2, rel=1e-4) and p["gpu_seconds"] == pytest.approx(7.959e8, rel=1e-3)
    assert p["gpu"] == "H100-SXM" and p["dtype"] == "bf16" and "dtype_note" not in p
    assert p.keys() & FIGURES == {"tokens", "train_flops", "gpu_days"} and "num_gpus" not in p
    assert p["missing"] == {"wall_days": ["--num-gpus"]}


def test_wall_days_add_a_gpu_count():
    # 9,212 GPU-days / 1024 GPUs = 8.996 days
    p = plan(*GPT3)
    assert p["wall_days"] == pytest.approx(8.996, rel=1e-3) and p["num_gpus"] == 1024
    assert p.keys() & FIGURES == {"tokens", "train_flops", "gpu_days", "wall_days"} and p["missing"] == {}


def test_flops_per_request_from_params_and_tokens_per_request_alone():
    # 2 * 175e9 * (20 + 300) = 1.12e14 FLOPs per request
    p = plan(*GPT3_REQUEST)
    assert p["flops_per_request"] == pytest.approx(1.12e14)
    assert p.keys() & FIGURES == {"flops_per_request"} and "gpu" not in p and "hours_per_day" not in p
    assert p["missing"] == {
        "seconds_per_request": ["--gpu", "--utilization"],
        "gpus_needed": ["--gpu", "--utilization", "--requests-per-day"],
    }


def test_seconds_per_request_add_a_gpu_and_a_utilization():
    # A100 bf16 312e12 x 0.5 = 1.56e14 FLOP/s; 1.12e14 / 1.56e14 = 0.717949 s; 1 / that = 1.3929 requests/s
    p = plan(*GPT3_REQUEST, "--gpu", "a100", "--utilization", "0.5")
    assert p["seconds_per_request"] == pytest.approx(0.717949, rel=1e-6)
    assert p["requests_per_second_per_gpu"] == pytest.approx(1.392857, rel=1e-6)
    assert p.keys() & FIGURES == {"flops_per_request", "seconds_per_request"}
    assert p["missing"] == {"gpus_needed": ["--requests-per-day"]}


def test_gpus_needed_add_a_request_rate():
    # 1e6 requests x 0.717949 s = 717,949 GPU-s over 24 h = 86,400 s: 8.31 -> 9 GPUs; over 8 h: 24.9 -> 25
    p = plan(*GPT3_REQUEST, "--gpu", "a100", "--utilization", "0.5", "--requests-per-day", "1M")
    assert p["gpus_needed"] == 9 and p["hours_per_day"] == 24 and p["missing"] == {}
    assert (
        plan(
            *GPT3_REQUEST, "--gpu", "a100", "--utilization", "0.5", "--requests-per-day", "1M", "--hours-per-day", "8"
        )["gpus_needed"]
        == 25
    )


def test_training_and_serving_flags_together_list_both_sides():
    p = plan("--params", "7B", "--tokens", "1T", "--requests-per-day", "1M", "--gpu", "A100")
    assert p["train_flops"] == 6 * 7e9 * 1e12 and p.keys() & FIGURES == {"tokens", "train_flops"}
    assert p["missing"] == {
        "gpu_days": ["--mfu"],
        "wall_days": ["--mfu", "--num-gpus"],
        "flops_per_request": ["--prompt-tokens", "--answer-tokens"],
        "seconds_per_request": ["--prompt-tokens", "--answer-tokens", "--utilization"],
        "gpus_needed": ["--prompt-tokens", "--answer-tokens", "--utilization"],
    }


# --- the dtype of the peak -----------------------------------------------------------------


def test_gpus_without_bf16_use_their_fp16_and_say_so():
    # T4: fp16 65 TFLOP/s. 3.15e23 / (65e12 * 0.4) = 1.2115e10 GPU-s / 86,400 = 140,224 GPU-days
    p = plan(*GPT3_DATA, "--gpu", "t4", "--mfu", "0.4")
    assert p["dtype"] == "fp16" and p["peak_flops"] == 65e12
    assert p["dtype_note"] == "T4 has no bf16: using fp16 (its 16-bit tensor format)"
    assert p["gpu_days"] == pytest.approx(140_224, rel=1e-5)
    # V100 (SXM2 data sheet): fp16 tensor 125 TFLOP/s, fp32 15.7
    assert accelerator("Tesla V100-SXM2-32GB").name == "V100"
    p = plan(*GPT3_REQUEST, "--gpu", "v100", "--utilization", "0.5")
    assert p["dtype"] == "fp16" and p["peak_flops"] == 125e12 and p["dtype_note"].startswith("V100 has no bf16")
    # a dtype that is named is used as named, without a note
    p = plan(*GPT3_REQUEST, "--gpu", "t4", "--dtype", "fp32", "--utilization", "0.5")
    assert p["dtype"] == "fp32" and p["peak_flops"] == 8.1e12 and "dtype_note" not in p


def test_a_named_dtype_the_gpu_lacks_is_an_error_listing_its_dtypes():
    with pytest.raises(ValueError) as err:
        plan(*GPT3_DATA, "--gpu", "t4", "--dtype", "bf16", "--mfu", "0.4")
    assert str(err.value) == "T4 has no bf16 peak (known: fp32, fp16)"


# --- nothing computable, and contradictory inputs --------------------------------------------


def test_nothing_computable_says_what_each_figure_needs():
    with pytest.raises(ValueError) as err:
        plan()
    assert str(err.value) == (
        "nothing to estimate: training FLOPs need --params, --tokens (or --images/--videos, --resolution, "
        "--patch); GPU-days also --gpu, --mfu; wall-clock days also --num-gpus; FLOPs per request need "
        "--params, --prompt-tokens, --answer-tokens; seconds per request also --gpu, --utilization; "
        "GPUs needed also --requests-per-day"
    )


def test_nothing_computable_names_the_inputs_given():
    with pytest.raises(ValueError) as err:
        plan("--mfu", "0.4")
    assert str(err.value) == (
        "nothing to estimate from --mfu: training FLOPs need --params, --tokens (or "
        "--images/--videos, --resolution, --patch); GPU-days also --gpu; "
        "wall-clock days also --num-gpus"
    )
    with pytest.raises(ValueError) as err:
        plan("--videos", "10", "--resolution", "256x256", "--fps", "24")
    assert str(err.value) == (
        "nothing to estimate from --videos, --resolution, --fps: tokens need --patch, "
        "--duration; training FLOPs also --params; GPU-days also --gpu, --mfu; "
        "wall-clock days also --num-gpus"
    )
    with pytest.raises(
        ValueError,
        match=r"^nothing to estimate from --params, --videos.*: "
        r"tokens need --frames \(or --fps and --duration\)",
    ):
        plan("--params", "1B", "--videos", "10", "--resolution", "8x8", "--patch", "2", "--gpu", "L4", "--mfu", ".3")
    with pytest.raises(ValueError) as err:
        plan("--hours-per-day", "8", "--params", "7B", "--gpu", "H100")
    assert str(err.value) == (
        "nothing to estimate from --params, --hours-per-day, --gpu: FLOPs per request "
        "need --prompt-tokens, --answer-tokens; seconds per request also --utilization; "
        "GPUs needed also --requests-per-day"
    )


def test_inputs_are_checked_even_when_no_figure_uses_them():
    with pytest.raises(ValueError, match="--mfu must be a fraction .* got 40"):
        plan(*GPT3_DATA, "--mfu", "40")
    with pytest.raises(ValueError, match="--utilization must be a fraction"):
        plan(*GPT3_REQUEST, "--utilization", "1.5")
    with pytest.raises(ValueError, match="--hours-per-day must be in"):
        plan(*GPT3_REQUEST, "--hours-per-day", "25")


def test_contradictions():
    with pytest.raises(ValueError, match="--tokens or a dataset"):
        plan("--params", "1B", "--tokens", "1T", "--images", "5")
    with pytest.raises(ValueError, match="--resolution.*need --images or --videos"):
        plan("--params", "1B", "--tokens", "1T", "--resolution", "8x8")
    with pytest.raises(ValueError, match="--fps.*need --videos"):
        plan("--params", "1B", "--images", "5", "--resolution", "8x8", "--patch", "2", "--fps", "24")


# --- the command line end to end -----------------------------------------------------------


def test_cli_json_gpt3_and_serving():
    out = cli(
        *GPT3,
        "--prompt-tokens",
        "1000",
        "--answer-tokens",
        "500",
        "--requests-per-day",
        "1M",
        "--hours-per-day",
        "8",
        "--utilization",
        "0.3",
        "--json",
    )
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
    assert p["missing"] == {}


def test_cli_json_with_attention():
    # Training as in test_training_attention_on_a_tiny_image_dataset, serving as in
    # test_serving_attention_by_hand (P = 3, A = 1: 10 pairs, 320 attention FLOPs), on an A100.
    out = cli(
        *TINY_IMAGES,
        "--prompt-tokens",
        "3",
        "--answer-tokens",
        "1",
        "--requests-per-day",
        "52000",
        "--utilization",
        "0.5",
        "--num-gpus",
        "4",
        "--json",
    )
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
    out = cli(
        *TINY_IMAGES, "--prompt-tokens", "3", "--answer-tokens", "1", "--requests-per-day", "1", "--utilization", "0.5"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split() == ["compute", "(6ND)", "9.600e+05", "FLOPs"] for line in lines)
    assert "compute (6ND + attention) 1.206e+06 FLOPs (20.4% attention), used below" in out.stdout
    assert "12 x 2 layers x d_attn 4 x S per token" in out.stdout and "S = tokens per sample" in out.stdout
    assert "compute (2NT + attention) 8.320e+03 FLOPs per request (3.8% attention), used below" in out.stdout
    assert "4 x 2 layers x d_attn 4 x 10 causal (query, key) pairs" in out.stdout


def test_cli_json_image_dataset():
    out = cli(
        "--params",
        "675M",
        "--images",
        "1e6",
        "--resolution",
        "256x256",
        "--patch",
        "2",
        "--latent-compression",
        "1,8,8",
        "--gpu",
        "A100",
        "--mfu",
        "0.5",
        "--json",
    )
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


def test_cli_single_figures_exit_0_and_list_what_is_missing():
    out = cli(*GPT3_DATA)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()]
    assert ["compute", "(6ND)", "3.150e+23", "FLOPs"] in lines
    assert lines[-3:] == [
        ["NOT", "COMPUTED"],
        ["GPU-days", "add", "--gpu,", "--mfu"],
        ["wall-clock", "days", "add", "--gpu,", "--mfu,", "--num-gpus"],
    ]
    out = cli(*GPT3_REQUEST)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()]
    assert ["compute", "(2NT)", "1.120e+14", "FLOPs", "per", "request"] in lines
    assert ["seconds", "per", "request", "add", "--gpu,", "--utilization"] in lines
    out = cli(*IMAGES)
    assert out.returncode == 0, out.stderr
    assert "tokens per image" in out.stdout and "7,936 (1024x1980, patch 1,16,16" in out.stdout
    assert ["training", "FLOPs", "add", "--params"] in [line.split() for line in out.stdout.splitlines()]


def test_cli_json_single_figure_keys():
    out = cli(*GPT3_DATA, "--json")
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert set(p) == {"params", "tokens", "epochs", "train_flops", "missing"}
    assert p["missing"] == {"gpu_days": ["--gpu", "--mfu"], "wall_days": ["--gpu", "--mfu", "--num-gpus"]}
    p = json.loads(cli(*GPT3_REQUEST, "--gpu", "t4", "--utilization", "0.5", "--json").stdout)
    assert set(p) == {
        "params",
        "gpu",
        "dtype",
        "dtype_note",
        "peak_flops",
        "prompt_tokens",
        "answer_tokens",
        "flops_per_request",
        "utilization",
        "seconds_per_request",
        "requests_per_second_per_gpu",
        "missing",
    }
    assert p["dtype"] == "fp16" and p["missing"] == {"gpus_needed": ["--requests-per-day"]}


def test_cli_text_says_which_dtype_a_gpu_without_bf16_uses():
    out = cli(*GPT3_DATA, "--gpu", "t4", "--mfu", "0.4")
    assert out.returncode == 0, out.stderr
    lines = [line.split(None, 1) for line in out.stdout.splitlines()]
    assert ["accelerator", "T4 fp16, 65 TFLOP/s dense peak, MFU 40%"] in lines
    assert ["dtype", "T4 has no bf16: using fp16 (its 16-bit tensor format)"] in lines


def test_cli_nothing_computable_is_one_error_line():
    out = cli("--mfu", "0.4")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().startswith("ministack flops estimate: error: nothing to estimate from --mfu: ")
    assert len(out.stderr.strip().splitlines()) == 1
    out = cli(*GPT3_DATA, "--gpu", "t4", "--dtype", "bf16", "--mfu", "0.4")
    assert out.returncode == 2
    assert out.stderr.strip() == "ministack flops estimate: error: T4 has no bf16 peak (known: fp32, fp16)"


def test_a_prefill_only_request_has_zero_answer_tokens():
    # scoring 100 prompt tokens with a 1B model: 2 * 1e9 * 100 = 2e11 FLOPs, nothing generated
    p = plan("--params", "1B", "--prompt-tokens", "100", "--answer-tokens", "0")
    assert p["answer_tokens"] == 0 and p["flops_per_request"] == 2e11
    with pytest.raises(ValueError, match="positive number"):
        estimate.parse_count("0")  # other counts stay positive
