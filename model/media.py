"""Reading and writing images and videos (PyAV through imageio; Pillow for images and GIFs).

Frames are uint8 arrays [T, H, W, 3]; tensors for the models are [3, T, H, W] in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


def check_complete(path: str | Path) -> None:
    """Raise if a video holds fewer frames than its header declares. A file cut off after its index
    (mp4 "faststart") still opens, and imageio's whole-file read then returns garbage frames for the
    missing ones without an error: count the packets actually present first."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        declared = stream.frames
        present = sum(1 for packet in container.demux(stream) if packet.size) if declared else 0
    if declared and present < declared:
        raise ValueError(f"truncated: {present} of {declared} frames present")


def read_frames(path: str | Path) -> np.ndarray:
    """All frames of a video (or the one frame of an image) as uint8 [T, H, W, 3]; a truncated
    video raises ValueError rather than returning garbage."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_SUFFIXES and path.suffix.lower() != ".gif":
        check_complete(path)
        frames = iio.imread(path, plugin="pyav")
    else:
        frames = iio.imread(path, index=None) if path.suffix.lower() == ".gif" else iio.imread(path)
    frames = np.asarray(frames)
    if frames.ndim == 2:  # grayscale image
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim == 3:  # one image
        frames = frames[None]
    return frames[..., :3]


def to_tensor(frames: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1], resized to (H, W) if given."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1
    if size is not None and tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x.transpose(0, 1), size=size, mode="bilinear", antialias=True, align_corners=False).transpose(
            0, 1
        )
    return x.clamp(-1, 1)


def _even(frames: np.ndarray) -> np.ndarray:
    """H.264 in yuv420p needs even sides: pad the last row / column by edge replication."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else frames


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8.0) -> Path:
    """uint8 [T, H, W, 3] -> .mp4 (H.264) or .gif, by suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, frames, extension=".gif", duration=1000 / fps, loop=0)
    else:
        iio.imwrite(path, _even(frames), plugin="pyav", codec="libx264", fps=fps)
    return path


def frame_grid(videos: np.ndarray, max_columns: int = 8) -> np.ndarray:
    """[B, T, H, W, 3] -> one image: a row per sample, up to `max_columns` evenly spaced frames."""
    b, t = videos.shape[:2]
    cols = np.unique(np.linspace(0, t - 1, min(t, max_columns)).round().astype(int))
    rows = [np.concatenate([v[i] for i in cols], axis=1) for v in videos]
    return np.concatenate(rows, axis=0)


def _tiles(images: np.ndarray, columns: int, gap: int) -> np.ndarray:
    """[N, H, W, 3] -> one image of `columns` tiles per row, `gap` grey pixels between tiles."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    sheet = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, c), 64, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        sheet[r * (h + gap) : r * (h + gap) + h, col * (w + gap) : col * (w + gap) + w] = image
    return sheet


def contact_sheet(videos: np.ndarray, columns: int = 4, gap: int = 2) -> np.ndarray:
    """[B, T, H, W, 3] -> one image: each sample's frames side by side, `columns` samples a row
    (a sheet of 80 clips stays square-ish instead of 80 rows tall)."""
    strips = np.concatenate([videos[:, i] for i in range(videos.shape[1])], axis=2)  # [B, H, T*W, 3]
    return _tiles(strips, columns, gap)


def tile_video(videos: np.ndarray, columns: int = 8, gap: int = 2) -> np.ndarray:
    """[B, T, H, W, 3] -> [T, H', W', 3]: the samples as tiles of one clip, all moving at once."""
    return np.stack([_tiles(videos[:, i], columns, gap) for i in range(videos.shape[1])])


def write_image(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image)
    return path
