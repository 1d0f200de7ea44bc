"""Bucketing: fit_to_bucket shapes, assign_bucket choices, the sampler's determinism, sharding and resume."""

import pytest
import torch
from torch.utils.data import DataLoader

from train.data.buckets import (
    BucketBatchSampler,
    BucketedDataset,
    assign_bucket,
    collate_clips,
    fit_to_bucket,
    frame_indices,
    parse_bucket,
)
from train.data.clip import Clip

BUCKETS = [(1, 32, 32), (1, 32, 64), (1, 64, 32), (5, 32, 32), (5, 32, 48), (9, 32, 32), (9, 32, 48)]


def clip(t, h, w, fps=8.0):
    return Clip(torch.rand(3, t, h, w) * 2 - 1, f"{t}x{h}x{w}", fps=fps)


@pytest.mark.parametrize(
    "size",
    [
        (1, 20, 30),
        (1, 1, 500),
        (1, 500, 1),
        (1, 64, 64),
        (9, 24, 32),
        (33, 7, 300),
        (17, 300, 7),
        (5, 32, 48),
        (2, 3, 3),
        (40, 100, 60),
    ],
)
@pytest.mark.parametrize("bucket", [(1, 16, 16), (5, 32, 48), (9, 48, 16)])
def test_fit_to_bucket_shapes(size, bucket):
    out = fit_to_bucket(clip(*size), bucket)
    assert tuple(out.video.shape) == (3, *bucket)
    assert out.video.is_contiguous() and out.video.min() >= -1 and out.video.max() <= 1


def test_fit_to_bucket_time_and_space():
    video = torch.arange(20.0).view(1, 20, 1, 1).expand(3, 20, 8, 8) / 20  # frame k holds k / 20
    out = fit_to_bucket(Clip(video, "", fps=24.0), (5, 8, 8))
    assert out.video[0, :, 0, 0].mul(20).round().tolist() == [1, 5, 9, 13, 17]  # centered, one stride
    assert out.fps == pytest.approx(6.0)
    assert frame_indices(20, 5, max_stride=2) == [5, 7, 9, 11, 13]
    assert frame_indices(9, 1) == [4] and frame_indices(3, 5) == [0, 0, 1, 2, 2]
    wide = torch.linspace(-1, 1, 40).view(1, 1, 1, 40).expand(3, 1, 10, 40)
    torch.testing.assert_close(fit_to_bucket(Clip(wide, ""), (1, 10, 10)).video, wide[..., 15:25])  # center crop
    tall = torch.linspace(-1, 1, 40).view(1, 1, 40, 1).expand(3, 1, 40, 10)
    torch.testing.assert_close(fit_to_bucket(Clip(tall, ""), (1, 10, 10)).video, tall[:, :, 15:25])
    same = clip(5, 32, 48)
    assert fit_to_bucket(same, (5, 32, 48)).video.equal(same.video)


def test_assign_bucket():
    assert assign_bucket((1, 20, 20), BUCKETS) == (1, 32, 32)
    assert assign_bucket((1, 100, 40), BUCKETS) == (1, 64, 32)  # images only in 1-frame buckets
    assert assign_bucket((20, 20, 20), BUCKETS) == (9, 32, 32)  # most frames that fit
    assert assign_bucket((7, 20, 20), BUCKETS) == (5, 32, 32)
    assert assign_bucket((20, 30, 44), BUCKETS) == (9, 32, 48)
    assert assign_bucket((20, 32, 64), [(17, 32, 32), (9, 32, 64)]) == (9, 32, 64)  # aspect before frames
    assert assign_bucket((20, 64, 32), BUCKETS) == (9, 32, 32)  # tall video: nearest video aspect, not an image
    assert assign_bucket((3, 32, 32), BUCKETS) == (1, 32, 32)  # too short for any video bucket: an image
    assert assign_bucket((1, 32, 32), [(5, 32, 32)]) is None
    assert assign_bucket((3, 32, 32), [(5, 32, 32)]) is None
    assert assign_bucket((1, 32, 320), BUCKETS, max_aspect_gap=0.5) is None
    sizes = [(1, 16, 16), (1, 32, 32), (1, 64, 64)]
    assert assign_bucket((1, 40, 40), sizes) == (1, 32, 32)  # largest without upscaling
    assert assign_bucket((1, 8, 8), sizes) == (1, 16, 16)  # else the smallest
    assert assign_bucket((5, 32, 32), ["5x32x32"]) == (5, 32, 32) == parse_bucket([5, 32, 32])


class Sizes:
    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def size_of(self, i):
        return self.sizes[i]

    def __getitem__(self, i):
        return None if i % 7 == 3 else clip(*self.sizes[i])


SIZES = Sizes(
    [(1, 30, 30)] * 50 + [(1, 30, 60)] * 23 + [(12, 30, 30)] * 31 + [(6, 32, 48)] * 17 + [(2, 5, 5)] * 3 + [(1, 9, 9)]
)


def make(**kw):
    return BucketBatchSampler(SIZES, [(1, 32, 32), (1, 32, 64), (5, 32, 32), (9, 32, 32), (5, 32, 48)], **kw)


def epoch(sampler, e):
    sampler.set_epoch(e)
    return list(sampler)


def test_sampler_batches():
    sampler = make(batch_size=4, bucket_batch_size={(9, 32, 32): 2, "5x32x48": 3}, seed=1)
    batches = epoch(sampler, 0)
    assert len(batches) == len(sampler) == (50 + 3 + 1) // 4 + 23 // 4 + 31 // 2 + 17 // 3  # 2-frame clips: images
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # each index at most once
    for batch in batches:
        buckets = {sampler.bucket_of[i] for i in batch}
        assert len(buckets) == 1 and len(batch) == sampler.batch_size[buckets.pop()]
    assert sampler.unassigned == [] and sampler.bucket_of[len(SIZES) - 2] == (1, 32, 32)
    videos_only = BucketBatchSampler(SIZES, [(5, 32, 32)], batch_size=4)
    assert len(videos_only.unassigned) == 50 + 23 + 3 + 1 and len(videos_only) == (31 + 17) // 4
    assert epoch(make(batch_size=4, bucket_batch_size={(9, 32, 32): 2, "5x32x48": 3}, seed=1), 0) == batches
    assert epoch(sampler, 1) != batches and epoch(sampler, 0) == batches  # per-epoch shuffle, reproducible
    assert epoch(make(batch_size=4, bucket_batch_size={(9, 32, 32): 2, "5x32x48": 3}, seed=2), 0) != batches
    with pytest.raises(ValueError):
        make(bucket_batch_size={(3, 32, 32): 1})


def test_sampler_ranks_lockstep_and_disjoint():
    ranks = [make(batch_size=3, bucket_batch_size={(9, 32, 32): 2}, seed=5, num_replicas=3, rank=r) for r in range(3)]
    per_rank = [epoch(s, 2) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0]) > 0
    for step in zip(*per_rank):
        assert len({ranks[0].bucket_of[b[0]] for b in step}) == 1  # same bucket on every rank at every step
        assert all(len({ranks[0].bucket_of[i] for i in b}) == 1 for b in step)
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat))  # disjoint across ranks
    with pytest.raises(ValueError):
        make(num_replicas=2, rank=2)


def test_sampler_resume_exactly():
    sampler = make(batch_size=4, seed=3)
    sampler.set_epoch(4)
    full = list(sampler.batches())
    it = iter(sampler)
    seen = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state == {"epoch": 4, "position": 5}
    resumed = make(batch_size=4, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # a loop calling set_epoch with the resumed epoch keeps the position
    rest = list(resumed)
    assert seen + rest == [b for _, b in full]
    assert resumed.state_dict() == {"epoch": 5, "position": 0}  # moved on to the next epoch by itself
    assert list(resumed) == [b for _, b in resumed.batches(5)]
    n = len(sampler)
    at_end = make(batch_size=4, seed=3)
    at_end.load_state_dict({"epoch": 4, "position": n})  # saved right after an epoch's last batch
    assert at_end.state_dict() == {"epoch": 5, "position": 0}
    assert list(at_end) == [b for _, b in at_end.batches(5)]
    assert sampler.state_dict(consumed=2 * n + 3) == {"epoch": 2, "position": 3}  # the loop's own count


def test_collate_and_loader():
    batch = collate_clips([clip(5, 32, 32), None, clip(5, 32, 32)])
    assert batch["video"].shape == (2, 3, 5, 32, 32) and batch["dropped"] == 1 and not batch["empty"]
    assert batch["captions"] == ["5x32x32"] * 2 and batch["bucket"] == (5, 32, 32) and batch["fps"].shape == (2,)
    fitted = collate_clips([clip(9, 20, 30), clip(1, 40, 40)], bucket=(1, 16, 16))
    assert fitted["video"].shape == (2, 3, 1, 16, 16)
    empty = collate_clips([None, None], bucket=(1, 16, 16))
    assert empty["empty"] and empty["dropped"] == 2 and empty["captions"] == [] and empty["video"] is None
    with pytest.raises(ValueError):
        collate_clips([clip(1, 8, 8), clip(1, 8, 16)])

    sampler = make(batch_size=4, seed=0)
    loader = DataLoader(BucketedDataset(SIZES, sampler), batch_sampler=sampler, collate_fn=collate_clips)
    dropped = 0
    for indices, batch in zip(sampler.batches(0), loader):
        bucket, idx = indices
        dropped += batch["dropped"]
        assert batch["dropped"] == sum(i % 7 == 3 for i in idx)
        if not batch["empty"]:
            assert batch["video"].shape == (4 - batch["dropped"], 3, *bucket)
    assert dropped > 0
