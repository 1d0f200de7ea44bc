"""Real data: captioned videos and images listed by a CSV, a JSONL or a folder (Open-Sora's convention).

    clips.csv     path,text            (or caption; paths relative to the CSV's folder, or absolute)
    clips.jsonl   {"path": ..., "text": ...} per line
    clips/        every video / image inside (recursive), captioned by a sidecar <name>.txt

Construction reads every file's headers (PyAV for videos, Pillow for images and GIFs; nothing
is decoded), so `size_of(i)` answers without decoding. Anything unusable (missing, corrupt, no
caption, unsupported) is skipped and recorded with its reason in `skipped`; a file that still
fails to decode makes `__getitem__` return None (the collate drops and counts it) and is
recorded in `failed`. Nothing raises on bad data. Extra CSV / JSONL columns become clip attrs.
`source_files()` names every file the data depends on, without opening any (a latent cache of
this data fingerprints them, train.data.latents).
Long videos: `frame_stride` keeps every k-th frame, `max_frames` caps the count; that first
window is decoded frame by frame and decoding stops there (not the whole file).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from model.media import VIDEO_SUFFIXES, read_frames, to_tensor
from train.data.clip import Clip

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MEDIA_SUFFIXES = VIDEO_SUFFIXES + IMAGE_SUFFIXES
TEXT_KEYS = ("text", "caption")
log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One usable file: where it is, its caption and its native metadata."""

    path: Path
    caption: str
    attrs: dict = field(default_factory=dict)
    frames: int = 1
    height: int = 0
    width: int = 0
    fps: float = 8.0


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _short(err: Exception, path: Path | None = None) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    text = text.replace(f": '{path}'", "").replace(str(path), path.name) if path is not None else text
    return text if len(text) <= 160 else text[:157] + "..."


def probe(path: Path) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) from the file's headers; raises _Skip if it is unusable."""
    suffix = path.suffix.lower()
    if suffix not in MEDIA_SUFFIXES:
        raise _Skip("unsupported", f"suffix {suffix!r}")
    if not path.is_file():
        raise _Skip("missing", "no such file")
    try:
        if suffix in IMAGE_SUFFIXES or suffix == ".gif":
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1) if suffix == ".gif" else 1
                duration = im.info.get("duration") or 125  # ms per frame; 8 fps if unstated
                (width, height), fps = im.size, 1000.0 / duration
        else:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise _Skip("corrupt", "no video stream")
                stream = container.streams.video[0]
                fps = float(stream.average_rate or stream.guessed_rate or 8.0)
                frames = stream.frames
                if not frames:  # some containers (webm) don't store it: estimate from the duration, rounding down
                    seconds = (
                        float(stream.duration * stream.time_base)
                        if stream.duration
                        else (container.duration or 0) / 1e6
                    )
                    frames = int(seconds * fps)
                width, height = stream.codec_context.width, stream.codec_context.height
    except Exception as err:  # noqa: BLE001 (any unreadable file is skipped, never fatal)
        if isinstance(err, _Skip):
            raise
        raise _Skip("corrupt", _short(err, path)) from err
    if frames < 1 or width < 1 or height < 1:
        raise _Skip("corrupt", f"{frames} frames of {width}x{height}")
    return frames, height, width, fps


class VideoFolder(Dataset):
    """Captioned videos and images from a CSV, a JSONL or a folder with sidecar captions."""

    def __init__(
        self, source: str | Path, max_frames: int | None = None, frame_stride: int = 1, scan: bool = True
    ) -> None:
        if frame_stride < 1 or (max_frames is not None and max_frames < 1):
            raise ValueError(f"frame_stride ({frame_stride}) and max_frames ({max_frames}) must be >= 1")
        self.source = Path(source)
        self.max_frames, self.frame_stride = max_frames, frame_stride
        self.entries: list[Entry] = []
        self.skipped: dict[str, list[tuple[str, str]]] = defaultdict(list)  # reason -> [(path, detail)]
        self.failed: list[tuple[str, str]] = []  # (path, reason) of decodes that failed in this process
        if scan:  # else call scan() before use
            self.scan()

    def _skip(self, reason: str, path, detail: str = "") -> None:
        self.skipped[reason].append((self._display(path), detail))

    def _display(self, path) -> str:  # relative to the source's folder where possible
        root = self.source if self.source.is_dir() else self.source.parent
        return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else str(path)

    def _rows(self):
        """(where, row dict) from the CSV or JSONL; bad lines are recorded as skipped."""
        if self.source.suffix.lower() == ".csv":
            with self.source.open(newline="", encoding="utf-8") as f:
                for n, row in enumerate(csv.DictReader(f), start=2):
                    yield f"{self.source.name}:{n}", row
            return
        with self.source.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    self._skip("bad line", f"{self.source.name}:{n}", _short(err))
                    continue
                yield f"{self.source.name}:{n}", row

    def _listing(self):
        """(path, caption, attrs) of every candidate, recording those without a path or caption."""
        if self.source.is_dir():
            for path in sorted(p for p in self.source.rglob("*") if p.suffix.lower() in MEDIA_SUFFIXES and p.is_file()):
                sidecar = next(
                    (s for s in (path.with_suffix(".txt"), path.with_name(path.name + ".txt")) if s.is_file()), None
                )
                caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar else ""
                if caption:
                    yield path, caption, {}
                else:
                    self._skip("no caption", path)
            return
        base = self.source.parent
        for where, row in self._rows():
            if not isinstance(row, dict) or not row.get("path"):
                self._skip("bad line", where, "no path")
                continue
            path = Path(str(row["path"]).strip())
            path = path if path.is_absolute() else base / path
            caption = next((str(row[k]).strip() for k in TEXT_KEYS if row.get(k) not in (None, "")), "")
            if not caption:
                self._skip("no caption", path)
                continue
            yield path, caption, {k: v for k, v in row.items() if k not in ("path", *TEXT_KEYS) and k is not None}

    def source_files(self) -> dict[str, Path]:
        """Every existing file this data is read from, by the name reports give it (relative to the
        source's folder where possible), without opening any media: the CSV / JSONL index and the
        files its rows name, or the folder's media and their sidecar captions. A file that appears
        among them later (a caption written, a listed file restored) changes the data."""
        if not self.source.exists():
            return {}
        if self.source.is_dir():
            media = [p for p in self.source.rglob("*") if p.suffix.lower() in MEDIA_SUFFIXES and p.is_file()]
            sidecars = [s for p in media for s in (p.with_suffix(".txt"), p.with_name(p.name + ".txt")) if s.is_file()]
            paths = set(media + sidecars)
        else:
            listed = VideoFolder(
                self.source, scan=False
            )._listing()  # a fresh instance: this one's `skipped` stays as scanned
            paths = {self.source} | {path for path, _, _ in listed if path.is_file()}
        return {self._display(path): path for path in sorted(paths)}

    def name_of(self, i: int) -> str:
        """Entry i's path as reports show it (relative to the source's folder where possible)."""
        return self._display(self.entries[i].path)

    def scan(self) -> VideoFolder:
        """(Re)read the listing and every file's metadata; never raises on bad data."""
        self.entries, self.skipped, self.failed = [], defaultdict(list), []
        if not self.source.exists():
            self._skip("missing", self.source, "source does not exist")
            return self
        for path, caption, attrs in self._listing():
            try:
                frames, height, width, fps = probe(path)
            except _Skip as skip:
                self._skip(skip.reason, path, skip.detail)
                continue
            self.entries.append(Entry(path, caption, attrs, frames, height, width, fps))
        return self

    def __len__(self) -> int:
        return len(self.entries)

    def _window(self, entry: Entry) -> tuple[int, int]:
        """(stride, frames) this dataset takes from a file: every stride-th frame, at most max_frames."""
        if entry.frames == 1:
            return 1, 1
        count = math.ceil(entry.frames / self.frame_stride)
        return self.frame_stride, count if self.max_frames is None else min(count, self.max_frames)

    def size_of(self, i: int) -> tuple[int, int, int]:
        """(T, H, W) of the clip `self[i]` returns (after stride / max_frames), without decoding."""
        entry = self.entries[i]
        return self._window(entry)[1], entry.height, entry.width

    def _decode(self, entry: Entry) -> np.ndarray:
        stride, count = self._window(entry)
        suffix = entry.path.suffix.lower()
        if suffix in IMAGE_SUFFIXES or suffix == ".gif":
            return read_frames(entry.path)[::stride][:count]
        if stride == 1 and count == entry.frames:
            return read_frames(entry.path)  # checks the file is complete first
        frames = []  # the window only: decode in order, stop as soon as it is complete
        with closing(iio.imiter(entry.path, plugin="pyav")) as stream:
            for k, frame in enumerate(stream):
                if k % stride == 0:
                    frames.append(frame)
                    if len(frames) == count:
                        break
        return np.stack(frames) if frames else np.zeros((0, entry.height, entry.width, 3), np.uint8)

    def __getitem__(self, i: int) -> Clip | None:
        """The clip [3, T, H, W] in [-1, 1] at its native size, or None if the file fails to decode."""
        entry = self.entries[i]
        expected, height, width = self.size_of(i)
        try:
            frames = self._decode(entry)
            if len(frames) < expected:
                raise ValueError(f"decoded {len(frames)} of {expected} frames")
        except Exception as err:  # noqa: BLE001 (a bad file costs one item, never the run)
            self.failed.append((self._display(entry.path), _short(err, entry.path)))
            log.warning("dropping %s: %s", entry.path, self.failed[-1][1])
            return None
        video = to_tensor(frames[:expected], size=(height, width))  # resizes only if the stream changed size
        fps = entry.fps / self._window(entry)[0]
        return Clip(video, entry.caption, fps=fps, attrs=dict(entry.attrs), source=str(entry.path))

    def report(self, examples: int = 3, dropped: dict[str, list[tuple[str, str]]] | None = None) -> str:
        """'N usable, M skipped: 3 corrupt (a.mp4: <reason>, ...), 1 no caption (b.png)', then the files
        that failed to decode and any `dropped` later by a user of the data (reason -> [(path, detail)],
        e.g. the latent cache's clips that fit no bucket)."""

        def listed(items) -> str:
            shown = [f"{p}: {d}" if d else p for p, d in items[:examples]]
            return ", ".join(shown) + (f", ... {len(items) - examples} more" if len(items) > examples else "")

        groups = sorted(self.skipped.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        total = sum(len(items) for _, items in groups)
        text = f"{len(self)} usable, {total} skipped"
        if groups:
            text += ": " + ", ".join(f"{len(items)} {reason} ({listed(items)})" for reason, items in groups)
        if self.failed:
            text += f"; {len(self.failed)} failed to decode ({listed(self.failed)})"
        for reason, items in (dropped or {}).items():
            if items:
                text += f"; {len(items)} {reason} ({listed(items)})"
        return text
