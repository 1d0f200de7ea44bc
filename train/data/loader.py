"""From a DataConfig to batches: the dataset, the bucketing sampler (sharded by rank) and the loader."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from train.config import DataConfig
from train.data.buckets import BucketBatchSampler, BucketedDataset, collate_clips, parse_bucket
from train.data.latent_cache import LatentCache, collate_cached

# Kinds whose clips are made on the fly, each a pure function of (seed, index): any `size` is
# valid, and a sweep sizes it so that no run sees a clip twice.
GENERATED_KINDS = ("procedural", "digits", "fashion")


def make_dataset(cfg: DataConfig):
    """The procedural clips (sized to the buckets), the moving digits' training scans or the
    moving Fashion-MNIST training images (each clip of one bucket's size; for fashion,
    `source` may name the IDX files' directory) or a real folder / CSV / JSONL."""
    if cfg.kind == "procedural":
        from train.data.procedural import ProceduralVideos

        buckets = [parse_bucket(b) for b in cfg.buckets]
        return ProceduralVideos(
            cfg.size,
            seed=cfg.seed,
            resolutions=tuple(sorted({(h, w) for _, h, w in buckets})),
            frames=tuple(sorted({t for t, _, _ in buckets})),
        )
    if cfg.kind == "digits":
        from train.data.digits import MovingDigits

        return MovingDigits(
            cfg.size, seed=cfg.seed, split="train", sizes=tuple(sorted({parse_bucket(b) for b in cfg.buckets}))
        )
    if cfg.kind == "fashion":
        from train.data.fashion import MovingFashion

        return MovingFashion(
            cfg.size,
            seed=cfg.seed,
            split="train",
            sizes=tuple(sorted({parse_bucket(b) for b in cfg.buckets})),
            root=cfg.source or None,
        )
    if cfg.kind == "folder":
        from train.data.folder import VideoFolder

        if not cfg.source:
            raise ValueError("data.kind=folder needs data.source: a folder, CSV or JSONL of (path, caption)")
        return VideoFolder(cfg.source)
    raise ValueError(f"unknown data.kind {cfg.kind!r}: 'fashion', 'procedural', 'digits' or 'folder'")


def make_loader(
    cfg: DataConfig, rank: int = 0, world: int = 1, cache: str | None = None
) -> tuple[DataLoader, BucketBatchSampler, object]:
    """Batches for this rank: of clips, or of cached latents when `cache` names a latent cache
    (train.data.latent_cache). Every rank gets the same bucket at every step (shapes match across
    ranks), and the sampler's state_dict resumes at the next batch."""
    dataset = LatentCache(cache) if cache else make_dataset(cfg)
    sampler = BucketBatchSampler(
        dataset,
        cfg.buckets,
        batch_size=cfg.batch_size,
        bucket_batch_size=cfg.bucket_batch_size,
        seed=cfg.seed,
        num_replicas=world,
        rank=rank,
    )
    if len(sampler) == 0:
        raise ValueError(
            f"no full batch fits the buckets {cfg.buckets} with batch size {cfg.batch_size} x {world} ranks"
        )
    # A private generator: a DataLoader otherwise draws its worker seed from the global RNG each
    # time it is iterated, which would shift the noise of every step after a resume.
    items, collate = (dataset, collate_cached) if cache else (BucketedDataset(dataset, sampler), collate_clips)
    loader = DataLoader(
        items,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return loader, sampler, dataset
