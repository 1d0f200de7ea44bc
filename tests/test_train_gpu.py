"""Training on CUDA (bf16 autocast): runs only where a GPU is present."""

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_tiny_run_on_cuda_records_every_step(tmp_path):
    from train.config import load_train_config
    from train.loop import train

    model = tmp_path / "model.yaml"
    model.write_text("model: {preset: tiny, hidden_size: 64, depth: 2, num_heads: 2}\n")
    cfg = load_train_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"model={model}",
            "max_steps=3",
            "data.size=32",
            "data.batch_size=4",
            "data.buckets=[[1,16,16],[3,16,16]]",
        ],
    )
    result = train(cfg)
    assert result["step"] == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    records = [json.loads(line) for line in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["dtype"] == "bf16" and r["peak_flops"] > 0 for r in records)
