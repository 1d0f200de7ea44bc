"""Test-session setup: make bf16 safe on this CPU before any test runs an op, one thread per
process (CI has 2 cores), and small shared fixtures."""

import os
from collections import Counter
from pathlib import Path

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
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def single_process_reference(tmp_path_factory) -> Path:
    """The run directory of one process on batch 4 for test_train's FOUR_FP32_STEPS: what every
    2-rank run on batch 2 (DDP and ZeRO-2 on one host, the 2-node SLURM jobs) is compared with.
    Trained once per session: each comparison would otherwise start the same run again."""
    from test_train import FOUR_FP32_STEPS, _model_yaml, _train

    root = tmp_path_factory.mktemp("single-process")
    proc = _train(root / "run", "--set", f"model={_model_yaml(root)}", *FOUR_FP32_STEPS, "--set", "data.batch_size=4")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return root / "run"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most slow-marked tests run first: `make test`'s workers each take whole files
    in this order, so the long ones start at once and the short ones fill in around them instead
    of one long file starting last on an otherwise idle machine. Order within a file is kept."""

    def path(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    slow = Counter(path(item) for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[path(item)])
