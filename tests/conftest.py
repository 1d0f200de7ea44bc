"""Test-session setup: make bf16 safe on this CPU before any test runs an op, one thread per
process (CI has 2 cores), and small shared fixtures."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from profiling.cpu import prepare_cpu  # noqa: E402

prepare_cpu()

import pytest  # noqa: E402
import torch  # noqa: E402
from slurm_cluster import slurm  # noqa: E402, F401  (the one-host SLURM cluster fixture)


@pytest.fixture
def tiny_llama():
    """A random 2-layer GQA Llama with tied embeddings (transformers' implementation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()
