"""Moving Fashion-MNIST items: the IDX reader, deterministic clips of the bucket's size, captions
naming the class and the direction, validation clips only from the t10k files, a clear error
where the data is missing, and the real data of Debian's dataset-fashion-mnist where installed."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from train.config import DataConfig, TrainConfig, validate
from train.data.buckets import assign_bucket
from train.data.digits import MovingDigits
from train.data.fashion import CLASS_WORDS, CLASSES, DEBIAN_DIR, ENV, MovingFashion, caption, images, read_idx
from train.data.glyphs import track
from train.data.loader import GENERATED_KINDS, make_dataset, make_loader
from train.data.procedural import DIRECTION_WORDS
from train.probe import alignment_score

BUCKETS = [[1, 16, 16], [5, 16, 24], [3, 32, 32]]
N = 20  # images per tiny split
TRAIN_INK, VAL_INK = 100, 255  # the tiny splits' ink levels: a clip's brightness tells its split


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzipped when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def tiny_split(ink: int) -> tuple[np.ndarray, np.ndarray]:
    """N 28x28 images, labels 0..9 twice: a block touching the top and bottom edges (as the real
    items fill the frame along their longer side), wider for higher labels."""
    labels = np.arange(N, dtype=np.uint8) % 10
    pictures = np.zeros((N, 28, 28), np.uint8)
    for i, label in enumerate(labels):
        pictures[i, :, 10 - label // 2 : 18 + label // 2] = ink
    return pictures, labels


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """The four IDX files, gzipped as Debian ships them: train at ink TRAIN_INK, t10k at VAL_INK."""
    for prefix, ink in (("train", TRAIN_INK), ("t10k", VAL_INK)):
        pictures, labels = tiny_split(ink)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", pictures)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def fingerprint(ds, i: int) -> str:
    clip = ds[i]
    return hashlib.sha256(clip.video.numpy().tobytes() + clip.caption.encode()).hexdigest()


def test_the_idx_reader(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        assert np.array_equal(read_idx(tmp_path / name), array) and read_idx(tmp_path / name).dtype == np.uint8
    (tmp_path / "bad").write_bytes(b"\0\0\x0d\x01" + (3).to_bytes(4, "big") + bytes(12))  # float32 items
    with pytest.raises(ValueError, match="unsigned bytes"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a-idx3-ubyte").read_bytes()[:-1])
    with pytest.raises(ValueError, match="bytes after the header"):
        read_idx(tmp_path / "short")


def test_images_are_padded_and_cached(idx_dir):
    pictures, labels = images("train", idx_dir)
    assert pictures.shape == (N, 30, 30) and pictures.dtype == np.uint8 and list(labels) == list(range(10)) * 2
    assert pictures[:, 0].max() == pictures[:, -1].max() == 0 and pictures.max() == TRAIN_INK  # a blank pixel each side
    assert images("train", idx_dir)[0] is pictures and images("val", idx_dir)[0].max() == VAL_INK
    with pytest.raises(ValueError, match="unknown split"):
        images("test", idx_dir)


def test_clips_are_deterministic_of_their_bucket_size_and_the_value_range(idx_dir):
    cfg = DataConfig(kind="fashion", source=str(idx_dir), size=40, buckets=BUCKETS, batch_size=2)
    ds = make_dataset(cfg)
    assert isinstance(ds, MovingFashion) and ds.split == "train" and "fashion" in GENERATED_KINDS
    seen = set()
    for i in range(len(ds)):
        clip = ds[i]
        size = tuple(clip.video.shape[1:])
        assert clip.video.shape[0] == 3 and size == ds.size_of(i) and assign_bucket(size, BUCKETS) == size
        seen.add(size)
        v = clip.video
        assert v.dtype.is_floating_point and v.min() == -1 and 0 > v.max() > -1  # black frame, ink at most TRAIN_INK
        assert (v[0] == v[1]).all() and (v[0] == v[2]).all()  # grey
        assert clip.source == f"fashion:train:{i}" and clip.attrs["label"] == clip.attrs["items"][0]["label"]
        if size[0] == 1:
            assert clip.attrs["motion"] == "static" and "moving" not in clip.caption
    assert seen == {tuple(b) for b in BUCKETS}
    sizes = tuple(sorted(map(tuple, BUCKETS)))  # as the loader passes them
    again = MovingFashion(40, seed=0, sizes=sizes, root=idx_dir)
    assert [fingerprint(again, i) for i in (7, 3)] == [fingerprint(ds, i) for i in (7, 3)]
    assert fingerprint(MovingFashion(40, seed=1, sizes=sizes, root=idx_dir), 3) != fingerprint(ds, 3)
    loader, _, _ = make_loader(cfg)
    for batch in loader:
        assert tuple(batch["video"].shape[2:]) == batch["bucket"] and batch["video"].shape[:2] == (2, 3)


def test_items_stay_inside_the_frame(idx_dir):
    ds = MovingFashion(30, seed=2, sizes=((9, 16, 16), (7, 32, 48)), two_item_fraction=0.3, root=idx_dir)
    two = 0
    for i in range(len(ds)):
        clip = ds[i]
        ink, items = clip.video[0].numpy() + 1, clip.attrs["items"]
        t, h, w = ink.shape
        assert (
            (ink[:, 0] == 0).all()
            and (ink[:, -1] == 0).all()
            and (ink[:, :, 0] == 0).all()
            and (ink[:, :, -1] == 0).all()
        )
        for item in items:
            top, left = track(item, t)
            assert top.min() >= 1 and left.min() >= 1 and (top + item["side"]).max() <= h - 1 + 1e-9
        if len(items) == 1:  # nothing is cut off: the ink is about the same in every frame
            total = ink.sum((1, 2))
            assert total.min() > 0.9 * total.max() and clip.attrs["motion"] == items[0]["motion"]
        else:
            two += 1
            assert clip.attrs["label"] is None and "motion" not in clip.attrs and " and " in clip.caption
    assert 0 < two < len(ds)


def test_captions_name_the_class_and_the_direction(idx_dir):
    assert caption({"frames": 9, "items": [{"label": 7, "motion": "left"}]}) == "a sneaker moving left"
    assert (
        caption({"frames": 9, "items": [{"label": 9, "motion": "up-right"}]})
        == "an ankle boot moving up and to the right"
    )
    assert caption({"frames": 1, "items": [{"label": 1, "motion": "static"}]}) == "trousers"
    assert [caption({"frames": 1, "items": [{"label": k}]}) for k in range(10)] == [w[0] for w in CLASS_WORDS]
    assert len(CLASSES) == len(CLASS_WORDS) == 10
    ds = MovingFashion(60, seed=3, sizes=((1, 16, 16), (5, 16, 16)), root=idx_dir)
    wordings = set()
    for i in range(len(ds)):
        attrs, text = ds.describe(i)
        assert any(word in text for word in CLASS_WORDS[attrs["label"]]), text
        if attrs["frames"] > 1:
            assert any(word in text for word in DIRECTION_WORDS[attrs["motion"]]), text
        wordings.add(text.split(" moving")[0])
    assert len(wordings) > 10  # varied wording, prefixes ("a photo of ...") included
    assert any(text.startswith(("a photo of ", "a picture of ", "an image of ")) for text in wordings)


def test_validation_clips_come_only_from_t10k(idx_dir, monkeypatch):
    monkeypatch.setenv(ENV, str(idx_dir))  # found through the variable, no root given
    val, train = (
        MovingFashion(30, seed=0, split="val", sizes=((3, 32, 32),)),
        MovingFashion(30, seed=0, sizes=((3, 32, 32),)),
    )
    assert val.split == "val" and val.source == "fashion:val" and len(val.pool) == len(train.pool) == N
    assert np.array_equal(val.images[:, 1:-1, 1:-1], tiny_split(VAL_INK)[0])
    for i in range(len(val)):
        assert val[i].attrs["split"] == "val" and val[i].video.max() > 0.9  # full VAL_INK in the box's middle
        assert train[i].video.max() <= 2 * TRAIN_INK / 255 - 1 + 1e-6  # never brighter than the train files' ink


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    for make in (
        lambda: MovingFashion(4, root=tmp_path / "nowhere"),
        lambda: make_dataset(DataConfig(kind="fashion", source=str(tmp_path / "nowhere"))),
    ):
        with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist") as err:
            make()
        assert ENV in str(err.value) and "nowhere" in str(err.value) and "train-images-idx3-ubyte" in str(err.value)
    with pytest.raises(ValueError, match="'fashion', 'procedural', 'digits' or 'folder'"):
        make_dataset(DataConfig(kind="mnist"))
    cfg = TrainConfig()
    cfg.data.kind = "fashion"
    validate(cfg)  # a known kind
    cfg.data.kind = "fashion-mnist"
    with pytest.raises(ValueError, match="'fashion'"):
        validate(cfg)


def test_the_probe_reads_the_motion_and_digits_keep_a_label(idx_dir):
    ds = MovingFashion(24, seed=2, sizes=((9, 32, 32),), root=idx_dir)
    truth = [ds.describe(i)[0] for i in range(len(ds))]
    scored = alignment_score([ds[i].video for i in range(len(ds))], truth)
    assert list(scored["accuracy"]) == ["motion"] and scored["score"] > scored["score_chance"] + 0.5
    digits = MovingDigits(20, seed=1, two_digit_fraction=0.5)
    labels = [digits.describe(i)[0] for i in range(len(digits))]
    assert {a["label"] for a in labels if len(a["digits"]) == 2} == {None}
    assert all(a["label"] == a["digits"][0]["label"] for a in labels if len(a["digits"]) == 1)


@pytest.mark.skipif(
    not Path(DEBIAN_DIR).is_dir(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_DIR} missing): apt-get install dataset-fashion-mnist",
)
def test_the_real_data_of_debians_package():
    (train, train_labels), (val, val_labels) = images("train", DEBIAN_DIR), images("val", DEBIAN_DIR)
    assert train.shape == (60_000, 30, 30) and val.shape == (10_000, 30, 30) and train.dtype == np.uint8
    assert np.array_equal(np.bincount(train_labels, minlength=10), [6000] * 10)
    assert np.array_equal(np.bincount(val_labels, minlength=10), [1000] * 10)
    assert train[:, 0].max() == 0 and train.max() == 255  # the blank border pixel, full-range ink
    ds = MovingFashion(6, seed=0, split="val", sizes=((5, 32, 32),), root=DEBIAN_DIR)
    for i in range(len(ds)):
        clip = ds[i]
        assert clip.video.min() == -1 and clip.video.max() > 0 and clip.attrs["items"][0]["scan"] < 10_000
        assert any(word in clip.caption for word in CLASS_WORDS[clip.attrs["label"]])
