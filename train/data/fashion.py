"""Moving Fashion-MNIST items: real photographs of clothes, shoes and bags bouncing around a black
frame, made exactly like the moving digits (train.data.glyphs: every clip a pure function of
(seed, index), one of 8 compass directions, images and videos mixed by the buckets).

The images are Zalando's Fashion-MNIST: 70,000 28x28 grey photographs (ink 0..255) in 10
classes, 6,000 per class for training and 1,000 for testing, as IDX files from Debian's package
`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist: /usr/share/datasets/fashion-mnist).
Elsewhere, point $MINISTACK_FASHION_MNIST or `data.source` at a directory holding the four files
(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte,
gzipped or not).

Held-out images: the data set's own split. `split="train"` draws only from the 60,000 training
images and `split="val"` only from the 10,000 test (t10k) images, so a validation loss cannot
come from memorised items.

Rendering: as the digit scans (train.data.glyphs.render): bilinear over a box of 0.4-0.6 x the
frame's shorter side, antialiased in small frames. The items fill the 28x28 frame along their
longer side (the ink touches its edge in nearly every image), so like the scans they get one
blank pixel each side (30x30): the ink then falls to 0 inside the box. They are kept as uint8
(63 MB for all 70,000; float32 would be four times that) and made float per rendered item.

Captions name the class in words and the motion: "a sneaker moving left", "an ankle boot moving
up and to the right", "a photo of a t-shirt"; attributes are train.data.glyphs' with the items
under `items` (each with its `label`, 0-9 as in CLASSES) and the single item's class in `label`.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from train.data import glyphs
from train.data.glyphs import DEFAULT_FPS, DEFAULT_SIZES, SPLITS, MovingGlyphs
from train.data.procedural import _pick

PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
ENV = "MINISTACK_FASHION_MNIST"
FILES = {"train": "train", "val": "t10k"}  # split -> the IDX files' prefix
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CLASS_WORDS = (  # per class, its wordings in captions (the first is the canonical one)
    ("a t-shirt", "a top", "a tee"),
    ("trousers", "a pair of trousers", "pants"),
    ("a pullover", "a sweater", "a jumper"),
    ("a dress", "a frock"),
    ("a coat", "a jacket"),
    ("a sandal", "an open sandal"),
    ("a shirt", "a button-up shirt"),
    ("a sneaker", "a trainer", "a running shoe"),
    ("a bag", "a handbag"),
    ("an ankle boot", "a boot"),
)
VIDEO_PREFIXES = ("", "", "a video of ", "a clip of ")
IMAGE_PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format, gzipped if its name ends in .gz) as a uint8
    array of its shape. Raises ValueError where the header or the length is wrong."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {body.size} bytes after the header, shape {shape} needs {int(np.prod(shape))}")
    return body.reshape(shape)


def data_dir(root: str | Path | None = None) -> Path:
    """Where the IDX files are: `root`, else $MINISTACK_FASHION_MNIST, else Debian's directory."""
    return Path(root or os.environ.get(ENV) or DEBIAN_DIR)


def _find(directory: Path, prefix: str, what: str) -> Path:
    names = [
        f"{prefix}-{what}",
        f"{prefix}-{what.replace('-', '.', 1)}",
    ]  # train-images-idx3-ubyte, train-images.idx3-ubyte
    for name in names:
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST not found: no {names[0]}(.gz) in {directory}. Install Debian's package {PACKAGE} "
        f"(apt-get install {PACKAGE}, into {DEBIAN_DIR}), or point ${ENV} (or data.source) at a directory "
        f"holding the four IDX files: train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (gzipped or not)"
    )


@lru_cache(maxsize=4)
def _load(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = FILES[split]
    images = read_idx(_find(Path(directory), prefix, "images-idx3-ubyte"))
    labels = read_idx(_find(Path(directory), prefix, "labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{directory}: {prefix} images {images.shape} and labels {labels.shape} do not match")
    if labels.size and not 0 <= labels.min() <= labels.max() < len(CLASSES):
        raise ValueError(f"{directory}: {prefix} labels outside 0-{len(CLASSES) - 1}")
    images = np.pad(images, ((0, 0), (1, 1), (1, 1)))  # one blank pixel each side, as the digit scans
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def images(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The split's images, uint8 ink 0..255 padded to [N, 30, 30] with blank pixels, and their labels
    (int64, 0-9 as in CLASSES): "train" the 60,000 training images, "val" the 10,000 test (t10k)
    images. Loaded once per directory and split (read-only arrays)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {SPLITS}")
    return _load(str(data_dir(root).resolve()), split)


def _subject(label: int, rng: np.random.Generator | None) -> str:
    return _pick(rng, CLASS_WORDS[label])


def caption(attrs: dict, rng: np.random.Generator | None = None) -> str:
    """Describe `attrs` in words; with no RNG the canonical prompt ("a sneaker moving left", "a
    coat"). Reads `frames` and per item of `items` its `label`, `motion` and (optionally) `bouncing`."""
    return glyphs.caption(attrs, rng, _subject, "items", VIDEO_PREFIXES, IMAGE_PREFIXES)


class MovingFashion(MovingGlyphs):
    """`size` clips drawn from `seed` and the images of `split` (train: the 60,000 training
    images; val: the 10,000 test images); index i is always the same clip. `root`: the directory
    of the IDX files (default $MINISTACK_FASHION_MNIST, else Debian's). Each clip's (T, H, W) is
    one of `sizes` (the loader passes the run's buckets)."""

    key, name = "items", "fashion"

    def __init__(
        self,
        size: int,
        seed: int = 0,
        split: str = "train",
        sizes: tuple[tuple[int, int, int], ...] = DEFAULT_SIZES,
        fps: tuple[float, ...] = DEFAULT_FPS,
        two_item_fraction: float = 0.0,  # of clips: two items instead of one
        root: str | Path | None = None,
    ) -> None:
        pixels, labels = images(split, root)
        super().__init__(size, seed, split, sizes, fps, two_item_fraction, images=pixels, labels=labels)

    caption = staticmethod(caption)  # the module's caption; rendering: MovingGlyphs.render over the split's images
