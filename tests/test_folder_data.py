"""VideoFolder: CSV, JSONL and sidecar-folder sources; bad files skipped with reasons, never raised."""

import json

import av
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from model.media import read_frames, write_video
from train.data.clip import Clip
from train.data.folder import VideoFolder


def frames(t, h, w, seed=0):
    """Smooth moving gradients (compress well, decode close to the source)."""
    y, x = np.mgrid[0:h, 0:w]
    out = [
        np.stack([(x * 4 + k * 9) % 256, (y * 4 + k * 5) % 256, np.full_like(x, (seed * 40 + k * 3) % 256)], -1)
        for k in range(t)
    ]
    return np.stack(out).astype(np.uint8)


def video(path, t=9, h=24, w=32, fps=8.0):
    return write_video(path, frames(t, h, w), fps=fps)


def image(path, h=20, w=30):
    iio.imwrite(path, frames(1, h, w)[0])
    return path


def truncated(path, tmp_path, faststart=False):
    """A real mp4 cut in half; faststart puts the index first, so the cut file still opens."""
    full = video(tmp_path / f"full_{path.stem}.mp4", t=20)
    if faststart:
        src_path, full = full, tmp_path / f"fs_{path.stem}.mp4"
        with av.open(str(src_path)) as src, av.open(str(full), "w", options={"movflags": "faststart"}) as dst:
            stream = dst.add_stream_from_template(src.streams.video[0])
            for packet in src.demux(src.streams.video[0]):
                if packet.dts is not None:
                    packet.stream = stream
                    dst.mux(packet)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for made in {full, tmp_path / f"full_{path.stem}.mp4"}:
        made.unlink()
    return path


@pytest.fixture
def media(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    video(d / "a.mp4", t=9, h=24, w=32, fps=10)
    video(d / "sub" / "b.mp4", t=5, h=16, w=48)
    image(d / "c.png", h=20, w=30)
    (d / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated(d / "half.mp4", tmp_path)
    (d / "text.png").write_text("this is not an image\n" * 20)
    return d


def check_usable(ds, captions):
    assert sorted(e.caption for e in ds.entries) == sorted(captions)
    for i in range(len(ds)):
        clip = ds[i]
        assert isinstance(clip, Clip)
        assert tuple(clip.video.shape) == (3, *ds.size_of(i))
        assert clip.video.dtype == torch.float32 and clip.video.min() >= -1 and clip.video.max() <= 1
        assert clip.caption == ds.entries[i].caption and clip.source == str(ds.entries[i].path)


def test_csv_source(media, tmp_path):
    b_abs = (media / "sub" / "b.mp4").resolve()
    rows = [
        "path,text",
        "a.mp4,a red ball",
        f"{b_abs},a wide clip",
        'c.png,"an image, with a comma"',
        "garbage.mp4,noise",
        "half.mp4,cut",
        "missing.mp4,gone",
        "text.png,not really",
        "a.mp4,",
    ]
    (media / "list.csv").write_text("\n".join(rows) + "\n")
    ds = VideoFolder(media / "list.csv")
    assert len(ds) == 3
    check_usable(ds, ["a red ball", "a wide clip", "an image, with a comma"])
    sizes = {e.caption: ds.size_of(i) for i, e in enumerate(ds.entries)}
    assert sizes == {"a red ball": (9, 24, 32), "a wide clip": (5, 16, 48), "an image, with a comma": (1, 20, 30)}
    assert ds[[e.caption for e in ds.entries].index("a red ball")].fps == pytest.approx(10)
    reasons = {r: [p for p, _ in items] for r, items in ds.skipped.items()}
    assert sorted(reasons["corrupt"]) == ["garbage.mp4", "half.mp4", "text.png"]
    assert reasons["missing"] == ["missing.mp4"] and reasons["no caption"] == ["a.mp4"]
    report = ds.report()
    assert report.startswith("3 usable, 5 skipped: 3 corrupt (")
    assert (
        "garbage.mp4: " in report
        and "1 missing (missing.mp4: no such file)" in report
        and "1 no caption (a.mp4)" in report
    )


def test_csv_caption_column_and_jsonl(media):
    (media / "list.csv").write_text("path,caption,score\nc.png,from caption,0.5\n")
    ds = VideoFolder(media / "list.csv")
    assert [e.caption for e in ds.entries] == ["from caption"] and ds[0].attrs == {"score": "0.5"}
    lines = [
        json.dumps({"path": "a.mp4", "text": "jsonl text", "score": 3}),
        "{not json",
        json.dumps({"path": "sub/b.mp4", "caption": "jsonl caption"}),
        json.dumps({"text": "no path"}),
        json.dumps({"path": "garbage.mp4", "text": "noise"}),
        "",
    ]
    (media / "list.jsonl").write_text("\n".join(lines) + "\n")
    ds = VideoFolder(media / "list.jsonl")
    check_usable(ds, ["jsonl text", "jsonl caption"])
    assert ds[0].attrs == {"score": 3}
    assert len(ds.skipped["bad line"]) == 2 and len(ds.skipped["corrupt"]) == 1
    assert "2 bad line (list.jsonl:2: JSONDecodeError" in ds.report()


def test_folder_with_sidecars(media):
    (media / "a.txt").write_text("sidecar for a\n")
    (media / "sub" / "b.mp4.txt").write_text("sidecar for b")
    for name in ("garbage", "half", "text"):
        (media / f"{name}.txt").write_text(name)
    (media / "notes.md").write_text("not media: ignored")
    ds = VideoFolder(media)
    check_usable(ds, ["sidecar for a", "sidecar for b"])
    assert [p for p, _ in ds.skipped["no caption"]] == ["c.png"]
    assert sorted(p for p, _ in ds.skipped["corrupt"]) == ["garbage.mp4", "half.mp4", "text.png"]
    assert ds.report().startswith("2 usable, 4 skipped: 3 corrupt (")


def test_missing_source_and_empty_folder(tmp_path):
    ds = VideoFolder(tmp_path / "nope.csv")
    assert len(ds) == 0 and "1 missing" in ds.report()
    assert VideoFolder(tmp_path).report() == "0 usable, 0 skipped"


def test_failures_at_load_time_return_none(media, tmp_path):
    video(media / "later.mp4")
    truncated(media / "fast.mp4", tmp_path, faststart=True)  # opens fine, its second half is gone
    for name in ("later", "fast", "a"):
        (media / f"{name}.txt").write_text(name)
    ds = VideoFolder(media)
    names = [e.path.name for e in ds.entries]
    assert "fast.mp4" in names  # the header scan cannot see the cut
    (media / "later.mp4").write_bytes(b"\0" * 100)  # broken after the scan
    assert ds[names.index("later.mp4")] is None
    assert ds[names.index("fast.mp4")] is None  # detected, not decoded to garbage
    assert isinstance(ds[names.index("a.mp4")], Clip)
    assert sorted(p for p, _ in ds.failed) == ["fast.mp4", "later.mp4"]
    assert "truncated" in dict(ds.failed)["fast.mp4"]
    assert "; 2 failed to decode (" in ds.report()


def test_long_video_window(tmp_path):
    video(tmp_path / "long.mp4", t=30, fps=12)
    (tmp_path / "long.txt").write_text("long")
    ds = VideoFolder(tmp_path, max_frames=7, frame_stride=2)
    assert ds.size_of(0) == (7, 24, 32)
    clip = ds[0]
    assert clip.video.shape == (3, 7, 24, 32) and clip.fps == pytest.approx(6)
    full = read_frames(tmp_path / "long.mp4")
    expected = torch.from_numpy(full[0:14:2]).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(clip.video, expected)  # exactly the decoder's frames 0, 2, ..., 12
    assert VideoFolder(tmp_path, frame_stride=4).size_of(0) == (8, 24, 32)  # ceil(30 / 4)
    with pytest.raises(ValueError):
        VideoFolder(tmp_path, frame_stride=0)


def test_gif_and_grayscale_image(tmp_path):
    write_video(tmp_path / "anim.gif", frames(5, 12, 20), fps=10)
    iio.imwrite(tmp_path / "gray.png", frames(1, 10, 14)[0, :, :, 0])
    for name in ("anim", "gray"):
        (tmp_path / f"{name}.txt").write_text(name)
    ds = VideoFolder(tmp_path)
    check_usable(ds, ["anim", "gray"])
    assert sorted(ds.size_of(i) for i in range(len(ds))) == [(1, 10, 14), (5, 12, 20)]
