"""Bucketing: every batch shares one (frames, height, width), chosen per clip without decoding.

    sampler = BucketBatchSampler(dataset, buckets=[(1, 32, 32), (17, 32, 48)], batch_size=8,
                                 bucket_batch_size={(17, 32, 48): 2}, seed=0, num_replicas=W, rank=r)
    loader = DataLoader(BucketedDataset(dataset, sampler), batch_sampler=sampler, collate_fn=collate_clips)

A clip goes to the bucket nearest its aspect ratio whose frames fit (`assign_bucket`, from
`dataset.size_of(i)`), and is cut to it (`fit_to_bucket`): a centered window of frames at one
integer stride, then a center crop to the bucket's aspect and one antialiased resize.
Data-parallel ranks draw from one global list of batches of batch_size * num_replicas, each
taking its own slice: disjoint indices, the same bucket at every step, the same batch count.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from train.data.clip import Clip

Bucket = tuple[int, int, int]  # (frames, height, width)


def parse_bucket(bucket) -> Bucket:
    """(f, h, w) from a tuple / list or a "FxHxW" string (the YAML config's keys)."""
    parts = bucket.lower().split("x") if isinstance(bucket, str) else bucket
    f, h, w = (int(p) for p in parts)
    return f, h, w


def frame_indices(frames: int, target: int, max_stride: int | None = None) -> list[int]:
    """`target` frames out of `frames`: a centered window at one integer stride.

    An integer stride keeps the motion uniform (evenly spaced fractional picks would jitter) and the
    clip's fps becomes fps / stride; the stride is as large as the clip allows (the window covers
    most of it) unless `max_stride` caps it to keep motion natural. A 1-frame target takes the
    middle frame; a clip shorter than the target (only if its metadata overstated its length)
    repeats frames, evenly spread."""
    if target == 1:
        return [frames // 2]
    if frames < target:
        return np.linspace(0, frames - 1, target).round().astype(int).tolist()
    stride = max(1, (frames - 1) // (target - 1))
    stride = min(stride, max_stride) if max_stride else stride
    start = (frames - ((target - 1) * stride + 1)) // 2
    return [start + k * stride for k in range(target)]


def fit_to_bucket(clip: Clip, bucket, max_stride: int | None = None) -> Clip:
    """The clip cut to exactly the bucket's (frames, height, width).

    Spatially: center-crop to the bucket's aspect ratio, then one antialiased bilinear resize to
    (height, width). That is resize-to-cover-then-center-crop done in the other order, to within
    a pixel of rounding, without ever building the enlarged frame (a 1000:1 strip would be huge)."""
    frames, height, width = parse_bucket(bucket)
    video = clip.video
    t, h, w = video.shape[1:]
    fps = clip.fps
    if t != frames:
        index = frame_indices(t, frames, max_stride)
        video = video[:, index]
        if frames > 1 and t > frames:
            fps = clip.fps / (index[1] - index[0])
    if h * width > w * height:  # taller than the bucket: crop rows
        keep = max(1, round(w * height / width))
        video = video[:, :, (h - keep) // 2 : (h - keep) // 2 + keep]
    elif h * width < w * height:  # wider: crop columns
        keep = max(1, round(h * width / height))
        video = video[:, :, :, (w - keep) // 2 : (w - keep) // 2 + keep]
    if tuple(video.shape[2:]) != (height, width):
        video = F.interpolate(
            video.transpose(0, 1), size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
        video = video.transpose(0, 1).clamp(-1, 1)
    return replace(clip, video=video.contiguous(), fps=fps)


def assign_bucket(size, buckets, max_aspect_gap: float | None = None) -> Bucket | None:
    """The bucket for a clip of size (T, H, W), or None if none fits.

    Images (T = 1) go to 1-frame buckets. A video goes to a multi-frame bucket with frames <= T
    (it becomes an image only if no such bucket exists). Among those: the nearest aspect ratio
    (|log| of the ratio of ratios), then the most frames, then the largest resolution that needs
    no upscaling (else the smallest). `max_aspect_gap` (in |log ratio|) refuses far-off aspects."""
    t, h, w = size
    buckets = [parse_bucket(b) for b in buckets]
    fits = [b for b in buckets if b[0] == 1] if t == 1 else [b for b in buckets if 1 < b[0] <= t]
    if not fits and t > 1:
        fits = [b for b in buckets if b[0] == 1]
    if not fits or h < 1 or w < 1:
        return None

    def gap(b: Bucket) -> float:
        return round(abs(math.log((w / h) / (b[2] / b[1]))), 9)

    def key(b: Bucket):
        upscale = b[1] * b[2] > h * w
        return gap(b), -b[0], upscale, b[1] * b[2] if upscale else -b[1] * b[2]

    best = min(fits, key=key)
    return None if max_aspect_gap is not None and gap(best) > max_aspect_gap else best


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each within one bucket and exactly that bucket's batch size.

    Per epoch (seeded by (seed, epoch)): each bucket's indices are shuffled and cut into global
    batches of batch_size * num_replicas (a remainder is dropped), the global batches of all
    buckets are shuffled together, and rank r takes slice r of each. Iterating continues from
    `position`; at the end of an epoch the sampler moves on to the next one by itself
    (`set_epoch` also works). Resume: `load_state_dict(state_dict())` continues with the very
    next batch. Note a DataLoader with workers draws batches ahead of the loop: then pass the
    loop's count of consumed batches, `state_dict(consumed=step)` (counted from epoch 0)."""

    def __init__(
        self,
        dataset,
        buckets,
        batch_size: int = 1,
        bucket_batch_size: dict | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        max_aspect_gap: float | None = None,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.buckets = sorted({parse_bucket(b) for b in buckets})
        overrides = {parse_bucket(b): int(n) for b, n in (bucket_batch_size or {}).items()}
        unknown = set(overrides) - set(self.buckets)
        if unknown:
            raise ValueError(f"bucket_batch_size names buckets not in the list: {sorted(unknown)}")
        self.batch_size = {b: overrides.get(b, batch_size) for b in self.buckets}  # 0 disables a bucket
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.bucket_of: dict[int, Bucket] = {}
        self.members: dict[Bucket, list[int]] = {b: [] for b in self.buckets}
        self.unassigned: list[int] = []  # indices no bucket fits: skipped
        chosen: dict[tuple, Bucket | None] = {}  # sizes repeat: assign each distinct one once
        for i in range(len(dataset)):
            size = tuple(dataset.size_of(i))
            if size not in chosen:
                chosen[size] = assign_bucket(size, self.buckets, max_aspect_gap)
            bucket = chosen[size]
            if bucket is None:
                self.unassigned.append(i)
            else:
                self.bucket_of[i] = bucket
                self.members[bucket].append(i)
        self.epoch, self.position = 0, 0

    def _global_batches(self, epoch: int) -> list[tuple[Bucket, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for bucket in self.buckets:
            size = self.batch_size[bucket] * self.num_replicas
            order = rng.permutation(np.asarray(self.members[bucket], dtype=np.int64))
            batches += [(bucket, order[s : s + size]) for s in range(0, len(order) - size + 1, size)] if size else []
        return [batches[k] for k in rng.permutation(len(batches))]

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank and every epoch)."""
        return sum(len(self.members[b]) // (n * self.num_replicas) for b, n in self.batch_size.items() if n)

    def batches(self, epoch: int | None = None) -> list[tuple[Bucket, list[int]]]:
        """This rank's whole epoch as (bucket, indices), without moving the sampler."""
        epoch = self.epoch if epoch is None else epoch
        out = []
        for bucket, batch in self._global_batches(epoch):
            n = self.batch_size[bucket]
            out.append((bucket, batch[self.rank * n : (self.rank + 1) * n].tolist()))
        return out

    def __iter__(self):
        if len(self) and self.position >= len(self):  # a state saved right after an epoch's last batch
            self.epoch, self.position = self.epoch + 1, 0
        for _, batch in self.batches()[self.position :]:
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning, unless it is the current one (a resumed position is kept)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self, consumed: int | None = None) -> dict:
        epoch, position = (self.epoch, self.position) if consumed is None else divmod(consumed, max(len(self), 1))
        if len(self) and position >= len(self):
            epoch, position = epoch + 1, 0
        return {"epoch": int(epoch), "position": int(position)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class BucketedDataset(Dataset):
    """dataset[i] fitted to the bucket the sampler assigned it (None passes through)."""

    def __init__(self, dataset, sampler: BucketBatchSampler, max_stride: int | None = None) -> None:
        self.dataset, self.bucket_of, self.max_stride = dataset, dict(sampler.bucket_of), max_stride

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Clip | None:
        clip = self.dataset[i]
        return None if clip is None else fit_to_bucket(clip, self.bucket_of[i], self.max_stride)


def collate_clips(items: list[Clip | None], bucket=None) -> dict:
    """Stack clips into {"video": [B, 3, T, H, W], "captions", "attrs", "fps", "sources", "bucket",
    "dropped", "empty"}. None items (failed decodes) are dropped and counted; clips not yet of the
    bucket's size are fitted to it. All dropped: {"empty": True, "captions": [], "video": None, ...}."""
    clips = [c for c in items if c is not None]
    dropped = len(items) - len(clips)
    if bucket is not None:
        bucket = parse_bucket(bucket)
        clips = [c if tuple(c.video.shape[1:]) == bucket else fit_to_bucket(c, bucket) for c in clips]
    if not clips:
        return {
            "video": None,
            "captions": [],
            "attrs": [],
            "fps": None,
            "sources": [],
            "bucket": bucket,
            "dropped": dropped,
            "empty": True,
        }
    shapes = {tuple(c.video.shape) for c in clips}
    if len(shapes) > 1:
        raise ValueError(f"clips of different shapes in one batch: {sorted(shapes)} (pass the bucket to fit them)")
    return {
        "video": torch.stack([c.video for c in clips]),
        "captions": [c.caption for c in clips],
        "attrs": [c.attrs for c in clips],
        "fps": torch.tensor([c.fps for c in clips], dtype=torch.float32),
        "sources": [c.source for c in clips],
        "bucket": tuple(clips[0].video.shape[1:]),
        "dropped": dropped,
        "empty": False,
    }
