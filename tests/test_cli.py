"""The `ministack` command end to end, in subprocesses, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ministack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ministack", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_dispatcher_help_and_unknown_command():
    assert "flops" in ministack("--help").stdout
    bad = ministack("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


def test_count_dit_xl_2_json():
    proc = ministack("flops", "count", "dit-xl-2", "--image-size", "256", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert {"params", "forward_flops", "train_flops", "law_flops", "exact_flops"} <= r.keys()
    assert r["params"] == 674_834_720 and r["tokens"] == 256
    assert r["forward_flops"] / 2e9 == pytest.approx(118.64, rel=0.001)  # the DiT paper's 118.64 GMACs
    assert r["train_flops"] == pytest.approx(r["exact_flops"], rel=0.01)
    assert r["law_flops"] == 6 * r["law_params"] * r["tokens"]


def test_count_video_config_human_output():
    proc = ministack(
        "flops", "count", "tiny", "--frames", "8", "--height", "64", "--width", "64", "--latent-compression", "1,4,4"
    )
    assert proc.returncode == 0, proc.stderr
    assert "forward+backward" in proc.stdout and "per_sample" in proc.stdout and "(6ND)" in proc.stdout


def test_count_decoder_directory(tmp_path, tiny_llama):
    tiny_llama.config.save_pretrained(tmp_path)
    proc = ministack("flops", "count", str(tmp_path), "--prompt-tokens", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["forward_flops"] == r["exact_forward_flops"] and r["forward_by_part"]["attention"] > 0


def test_count_without_a_size_gives_the_parameters_and_names_the_size_flags():
    proc = ministack("flops", "count", "dit-xl-2", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["params"] == 674_834_720 and "forward_flops" not in r  # DiT-XL/2's count (the DiT paper: 675 M)
    assert r["missing"] == {
        k: ["--image-size (or --height and --width, or --latent)"] for k in ("forward_flops", "train_flops")
    }
    text = ministack("flops", "count", "dit-xl-2").stdout
    assert "params 674,834,720" in text and "FLOPs not counted: give the input size (--image-size S" in text


def test_count_bad_input_is_a_clear_error():
    proc = ministack("flops", "count", "dit-xl-2", "--height", "256")
    assert proc.returncode == 2 and "--image-size" in proc.stderr and "Traceback" not in proc.stderr
    proc = ministack("flops", "count", "no-such-model", "--image-size", "256")
    assert proc.returncode == 2 and "unknown config 'no-such-model'" in proc.stderr


def test_report_end_to_end(tmp_path):
    from profiling.hardware import DevicePeak
    from profiling.ledger import Ledger, make_record
    from profiling.measure import FlopCount

    ledger = Ledger(tmp_path / "run.jsonl")
    for n in (100, 1000):
        count = FlopCount({"dense": 2 * 50 * n, "attention": 4 * n * n})
        ledger.append(
            make_record("infer", count, {"dense": 50}, n, 0.01, DevicePeak("cpu", "fp32", 1e10, "test"), f"prompt={n}")
        )
    proc = ministack("flops", "report", str(ledger.path))
    assert proc.returncode == 0, proc.stderr
    assert "== infer: 2 records" in proc.stdout and (tmp_path / "run.png").is_file()
    proc = ministack("flops", "report", str(ledger.path), "--json", "--plot", str(tmp_path / "p.png"))
    r = json.loads(proc.stdout)
    assert r["kinds"]["infer"]["measured_flops"] == 2 * 50 * 1100 + 4 * (100**2 + 1000**2)
    assert r["kinds"]["infer"]["law_flops"] == 2 * 50 * 1100
    missing = ministack("flops", "report", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "no such ledger" in missing.stderr


def test_count_yaml_config_matches_exact_formula():
    from model.configs import load_config
    from model.flops.formula import dit_flops

    path = ROOT / "configs" / "models" / "video-s-factorized.yaml"
    cfg = load_config(str(path))
    assert cfg.attention == "factorized" and cfg.depth == 8 and cfg.hidden_size == 384
    proc = ministack("flops", "count", str(path), "--latent", "4,8,8", "--text-len", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["train_flops"] == sum(dit_flops(cfg, 1, 4, 8, 8, text_len=12, backward=True).values())


def test_count_gives_the_dit_papers_gmacs_per_sample():
    one = json.loads(ministack("flops", "count", "dit-s-2", "--image-size", "256", "--json").stdout)["forward_flops"]
    text = ministack("flops", "count", "dit-s-2", "--image-size", "256", "--batch", "3").stdout
    assert f"forward = {one / 2e9:.2f} GMACs per sample" in text  # 6.06 in the DiT paper's table
