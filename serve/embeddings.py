"""Sentence embeddings for /v1/embeddings: a local encoder run as its sentence-transformers
pipeline describes it (modules.json: the transformer, the pooling of 1_Pooling/config.json,
L2 normalisation when listed; max_seq_length from sentence_bert_config.json), without the
sentence-transformers package. The default is the shipped all-MiniLM-L6-v2 (mean pooling,
normalised, 256 tokens, 384 dimensions).

Inputs are token ids (the server tokenizes text); a request's inputs run in batches of
`batch_size` sorted by length, so padding stays small, on the encoder's own thread-safe lock:
the encoder is small and its forwards short, and the LLM engine keeps its own thread.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

POOLINGS = ("cls", "mean", "max")


class Embedder:
    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 32) -> None:
        """`path`: a local transformers encoder directory (with or without a sentence-transformers
        pipeline beside it); None: the shipped all-MiniLM-L6-v2. ValueError for a pooling this
        does not implement (the pipeline's mean-sqrt-len, weighted or last-token modes)."""
        from transformers import AutoModel, AutoTokenizer

        from profiling.shipped import minilm_dir

        self.path = Path(path) if path is not None else minilm_dir()
        if not (self.path / "config.json").is_file():
            raise ValueError(f"embedding model {str(self.path)!r} is not a transformers directory (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        self.name = self.path.name if path is not None else "all-MiniLM-L6-v2"
        self.pooling, self.normalize = self._pipeline()
        bert = self.path / "sentence_bert_config.json"
        limit = json.loads(bert.read_text()).get("max_seq_length") if bert.is_file() else None
        self.max_tokens = int(limit or self.model.config.max_position_embeddings)
        self.dimensions = int(self.model.config.hidden_size)
        self._lock = threading.Lock()

    def _pipeline(self) -> tuple[str, bool]:
        """(pooling, normalize) from the sentence-transformers files; mean and no normalisation
        without them."""
        modules = self.path / "modules.json"
        listed = json.loads(modules.read_text()) if modules.is_file() else []
        normalize = any(m["type"].endswith(".Normalize") for m in listed)
        pool = next((m for m in listed if m["type"].endswith(".Pooling")), None)
        if pool is None:
            return "mean", normalize
        config = json.loads((self.path / pool["path"] / "config.json").read_text())
        modes = [
            k.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
            for k, v in config.items()
            if k.startswith("pooling_mode_") and v
        ]
        if len(modes) != 1 or modes[0] not in POOLINGS:
            raise ValueError(
                f"embedding model pooling {modes} is not implemented (supported: one of {', '.join(POOLINGS)})"
            )
        return modes[0], normalize

    @torch.no_grad()
    def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """[len(inputs), dimensions] float32 embeddings of token-id inputs (each already
        carrying the tokenizer's special tokens). ValueError naming an input over max_tokens."""
        for i, ids in enumerate(inputs):
            if not ids or len(ids) > self.max_tokens:
                raise ValueError(f"input {i} has {len(ids)} tokens; this embedding model takes 1 to {self.max_tokens}")
        out = torch.empty(len(inputs), self.dimensions)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        with self._lock:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                width = max(len(inputs[i]) for i in batch)
                ids = torch.full((len(batch), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
                    mask[row, : len(inputs[i])] = 1
                states = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).last_hidden_state.float()
                out[batch] = self._pool(states, mask.to(self.device)).cpu()
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out

    def _pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return states[:, 0]
        keep = mask.unsqueeze(-1).to(states.dtype)
        if self.pooling == "max":
            return states.masked_fill(keep == 0, float("-inf")).amax(1)
        return (states * keep).sum(1) / keep.sum(1).clamp(min=1)
