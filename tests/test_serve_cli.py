"""`ministack serve`'s engine flags, generated from EngineConfig's fields (serve.config.flag)
beside the few written by hand: the same flags and defaults as the engine's own, each value
reaching its field."""

from __future__ import annotations

import argparse

import pytest

from serve.cli import add_engine_arguments, engine_config, parser
from serve.config import EngineConfig, flag_fields

ENGINE_FLAGS = {  # the flags users and scripts rely on; generated or not, none may go missing
    "--model",
    "--device",
    "--dtype",
    "--half-weights",
    "--max-model-len",
    "--rope-scaling",
    "--kv-cache-dtype",
    "--kv-cache-gb",
    "--kv-cache-fraction",
    "--kv-cache-disk",
    "--kv-cache-disk-gb",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--speculative-config",
    "--scheduling-policy",
    "--json-max-digits",
    "--max-itl-ms",
    "--long-prefill-token-threshold",
    "--max-num-partial-prefills",
}


def test_the_engine_flags_are_all_there_and_default_to_the_engine_config():
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    assert {o for a in p._actions for o in a.option_strings} - {"-h", "--help"} == ENGINE_FLAGS
    assert engine_config(parser().parse_args([])) == EngineConfig()
    for f in flag_fields():
        assert p.get_default(f.name) == f.default, f.name


def test_each_flag_reaches_its_field():
    args = parser().parse_args(
        [
            "--model",
            "m",
            "--device",
            "cuda",
            "--dtype",
            "float16",
            "--kv-cache-dtype",
            "int8",
            "--kv-cache-fraction",
            "0.5",
            "--max-model-len",
            "99",
            "--max-num-seqs",
            "3",
            "--max-num-batched-tokens",
            "77",
            "--scheduling-policy",
            "priority",
            "--kv-cache-disk",
            "/tmp/kv",
            "--kv-cache-disk-gb",
            "2",
            "--half-weights",
            "off",
            "--rope-scaling",
            '{"rope_type": "yarn", "factor": 2.0}',
            "--speculative-config",
            '{"method": "ngram", "num_speculative_tokens": 3}',
            "--json-max-digits",
            "9",
            "--max-itl-ms",
            "80",
            "--long-prefill-token-threshold",
            "256",
            "--max-num-partial-prefills",
            "2",
        ]
    )
    config = engine_config(args, ledger="x.jsonl")
    assert (config.model, config.device, config.dtype, config.kv_cache_dtype, config.kv_cache_fraction) == (
        "m",
        "cuda",
        "float16",
        "int8",
        0.5,
    )
    assert (config.max_model_len, config.max_num_seqs, config.max_num_batched_tokens, config.scheduling_policy) == (
        99,
        3,
        77,
        "priority",
    )
    assert (config.kv_cache_disk, config.kv_cache_disk_bytes, config.half_weights) == ("/tmp/kv", 2 << 30, False)
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 2.0} and config.num_speculative_tokens == 3
    assert config.ledger == "x.jsonl" and config.kv_cache_bytes is None and config.json_max_digits == 9
    assert (config.max_itl_ms, config.long_prefill_token_threshold, config.max_num_partial_prefills) == (80.0, 256, 2)


@pytest.mark.parametrize(
    "argv",
    [
        ["--kv-cache-gb", "1", "--kv-cache-fraction", "0.5"],  # one budget or the other
        ["--dtype", "float64"],
        ["--scheduling-policy", "lifo"],
        ["--max-num-seqs", "many"],
        ["--rope-scaling", "[1, 2]"],  # not a JSON object
        ["--show-hidden-metrics-for-version", "latest"],  # vLLM's flag takes a version
    ],
)
def test_a_bad_flag_is_refused_naming_it(argv, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
    assert f"argument {argv[-2]}:" in capsys.readouterr().err


def test_the_hidden_metrics_flag_takes_a_vllm_version():
    assert parser().parse_args([]).show_hidden_metrics_for_version is None
    for text in ("0.10", "0.10.2"):
        assert parser().parse_args(["--show-hidden-metrics-for-version", text]).show_hidden_metrics_for_version == (
            0,
            10,
        )
