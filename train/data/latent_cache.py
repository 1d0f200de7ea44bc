"""The latent cache as a dataset: the clips train.data.latents encoded, read back memory-mapped.

Apart from the builder so that the loader, which reads a cache, does not import what builds one
(the builder makes its clips with the loader's datasets). The files are described in
train.data.latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

MANIFEST = "cache.json"
NULL = "null.safetensors"


@dataclass
class CachedClip:
    """What the DiT stage needs of one clip; the cache's unit as Clip is the pixel datasets'."""

    latents: torch.Tensor  # [C, t, h, w]
    context: torch.Tensor | None  # [L, D]
    context_mask: torch.Tensor | None  # [L]
    caption: str
    source: str


class LatentCache(Dataset):
    """The cached clips as a dataset the bucketing sampler can batch: `size_of(i)` is the clip's
    bucket (video size), items are CachedClip. Shards are opened lazily and memory-mapped."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise ValueError(
                f"{self.directory} is not a latent cache (no {MANIFEST}): build it with `ministack train cache`"
            )
        self.manifest = json.loads(path.read_text())
        self.items: list[tuple[int, int]] = []  # (shard, row)
        self.meta: list[dict] = []
        for s, shard in enumerate(self.manifest["shards"]):
            self.meta.append(json.loads((self.directory / shard["file"]).with_suffix(".json").read_text()))
            self.items += [(s, row) for row in range(shard["count"])]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.items)

    def size_of(self, i: int) -> tuple[int, int, int]:
        return tuple(self.manifest["shards"][self.items[i][0]]["bucket"])

    def _shard(self, s: int):
        if s not in self._open:
            self._open[s] = safe_open(str(self.directory / self.manifest["shards"][s]["file"]), "pt")
        return self._open[s]

    def __getitem__(self, i: int) -> CachedClip:
        s, row = self.items[i]
        f = self._shard(s)

        def get(key: str) -> torch.Tensor:
            return f.get_slice(key)[row : row + 1][0]

        text = self.manifest["text"]
        return CachedClip(
            get("latents").float(),
            get("context").float() if text else None,
            get("context_mask").bool() if text else None,
            self.meta[s]["captions"][row],
            self.meta[s]["sources"][row],
        )

    def null_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's (context [L, D], mask [L])."""
        with safe_open(str(self.directory / NULL), "pt") as f:
            return f.get_tensor("context").float(), f.get_tensor("context_mask").bool()

    def __getstate__(self) -> dict:  # DataLoader workers reopen the shards themselves
        return self.__dict__ | {"_open": {}}


def collate_cached(items: list[CachedClip]) -> dict:
    """A batch of cached clips: {"latents", "context", "context_mask", "captions", "sources", "dropped"}."""
    text = items[0].context is not None
    return {
        "latents": torch.stack([c.latents for c in items]),
        "context": torch.stack([c.context for c in items]) if text else None,
        "context_mask": torch.stack([c.context_mask for c in items]) if text else None,
        "captions": [c.caption for c in items],
        "sources": [c.source for c in items],
        "dropped": 0,
    }
