"""Generated datasets in the challenge layouts, for the demo and the scale benchmark.

`generate_demo_dataset` writes the final-round layout (JPEG frame zips, titles, OCR, ASR, a two-level
category map with a long tail) with a planted signal for every part of the system. The 14 classes
come in four groups; inside a group everything but one thing is drawn from the same distribution:

    text-only-k   frames from one shared pool of random scenes; the title (and often the ASR)
                  carries class keywords.
    frame-only-k  shared neutral text; every frame shows the class's shape (circle, square, ...).
    order-k       shared neutral text; each frame is a disc whose size and brightness follow a level
                  drawn i.i.d. from one distribution; only the ORDER differs: ascending, descending,
                  peak (rise then fall). The multiset of frames, hence the mean frame, is the same.
    mix-k         shared neutral text; four stripe/checker patterns with the same two colours in
                  equal areas (so every frame has the same mean colour); each video holds two kinds in
                  equal numbers, and the class says WHICH two: mix-1 = {h,v} or {fine,coarse},
                  mix-2 = {h,fine} or {v,coarse}, mix-3 = {h,coarse} or {v,fine}. Every kind is a
                  quarter of every class's frames (a single frame says nothing), and the mean-pooled
                  frames of a class's two pairs are mirror images about one centre common to all
                  three classes, so a linear model on mean-pooled frame features can get both pairs
                  right for one class only (balanced accuracy <= 2/3; near 1/2 in practice); a
                  nonlinear head or per-cluster pooling finds the pairs.

Groups differ from each other (order frames do not look like scenes), so the coarse level mixes them:
coarse class j holds text-only-(j+1), frame-only-(j+1), order-(j+1) and mix-(j+1).

`generate_feature_zip_dataset` writes the preliminary layout (one zip of float16 `<id>.npy` frame
features per split) over the challenge's 200-class map, for the scale benchmark.

Both write one video at a time and draw each video from its own generator seeded by (seed, split,
index), so output is identical byte for byte under one seed. Memory holds one video plus what zipfile
keeps for the central directory of the feature zip (~0.4 KB a video): peak RSS 47 MiB at 10k
videos, 82 MiB at 100k (4.03 GiB written in 202 s, bench/make_feature_zip_dataset.py).
"""
import csv
import io
import json
import shutil
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from core.records import write_json
from core.schema import LABELLED_SPLIT
from demo import DemoError
from features.categories import BUILTIN_MAP, load_category_map

ZIP_DATE = (1980, 1, 1, 0, 0, 0)                          # fixed member time: byte-identical zips
JPEG_QUALITY = 90

NEUTRAL_WORDS = (
    "video clip today share watch new best look moment daily life story friends weekend home "
    "simple quick easy happy time little big first last good nice great fun part full short long "
    "view scene light colour show trip city street morning evening night people small world real"
).split()
CLASS_WORDS = {               # keywords of text-only-k; none of them is a neutral word
    1: ("violin", "cello", "orchestra"),
    2: ("kayak", "canoe", "paddle"),
    3: ("sourdough", "bakery", "croissant"),
    4: ("telescope", "galaxy", "nebula"),
}
SHAPES = ("circle", "square", "triangle", "cross")         # frame-only-1..4
PATTERNS = ("hstripes", "vstripes", "checker-fine", "checker-coarse")
MIX_PAIRS = {                 # mix-k: the two possible kind pairs (indices into PATTERNS)
    1: ((0, 1), (2, 3)),
    2: ((0, 2), (1, 3)),
    3: ((0, 3), (1, 2)),
}
ORDERS = {1: "ascending", 2: "descending", 3: "peak"}
PALETTE = np.array([(220, 60, 50), (50, 160, 80), (60, 90, 210), (230, 200, 60), (150, 70, 180),
                    (40, 180, 190), (240, 140, 40), (200, 200, 200), (90, 90, 90)])
PATTERN_COLOURS = ((220, 90, 40), (40, 120, 220))
ORDER_HUE = np.array([1.0, 0.85, 0.45])
ORDER_BACKGROUND = (25, 25, 35)


@dataclass(frozen=True)
class DemoClass:
    category_id: str     # coarse id (2 chars) + 2 chars
    level1_id: str
    signal: str          # "text-only", "frame-only", "order" or "mix"
    k: int               # 1-based index inside its signal group

    @property
    def name(self):
        return f"{self.signal}-{self.k}"


def demo_classes():
    """The 14 demo classes, in long-tail rank order (largest first): the groups interleave, so
    every group has head and tail classes, and coarse class k-1 holds the k-th class of each group."""
    groups = (("text-only", 4), ("frame-only", 4), ("order", 3), ("mix", 3))
    classes = []
    for k in range(1, 5):
        for signal, size in groups:
            if k <= size:
                coarse = f"{k - 1:02d}"
                classes.append(DemoClass(f"{coarse}{len(classes):02d}", coarse, signal, k))
    return classes


def long_tail_counts(n, n_classes, ratio):
    """Zipf counts summing to n, largest first, largest/smallest about `ratio` (n_classes,)."""
    exponent = np.log(ratio) / np.log(n_classes) if n_classes > 1 else 0.0
    weights = 1.0 / np.arange(1, n_classes + 1) ** exponent
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: n - counts.sum()]] += 1        # largest remainders get the leftovers
    return counts


# ---------------------------------------------------------------- text

def _words(rng, lo, hi):
    return [str(w) for w in rng.choice(NEUTRAL_WORDS, size=int(rng.integers(lo, hi + 1)))]


def _insert_keyword(rng, words, keywords):
    words = list(words)
    words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(keywords)))
    return words


def make_text(cls, rng):
    """title, asr and ocr of one video; only text-only classes put class keywords in."""
    title = _words(rng, 3, 8)
    asr = _words(rng, 4, 14) if rng.random() < 0.7 else []     # some videos have no speech
    if cls.signal == "text-only":
        keywords = CLASS_WORDS[cls.k]
        if rng.random() < 0.9:      # a tenth of text-only titles carry no keyword at all
            title = _insert_keyword(rng, title, keywords)
        if asr and rng.random() < 0.5:
            asr = _insert_keyword(rng, asr, keywords)
    seconds = np.sort(rng.choice(60, size=int(rng.integers(0, 4)), replace=False))
    ocr = [{"time": int(t), "text": " ".join(_words(rng, 1, 4))} for t in seconds]
    return {"title": " ".join(title), "asr": " ".join(asr), "ocr": ocr}


# ---------------------------------------------------------------- frames

def _colour(rng, exclude=None):
    choices = [i for i in range(len(PALETTE)) if i != exclude]
    index = int(rng.choice(choices))
    jitter = rng.integers(-15, 16, size=3)
    return index, tuple(int(c) for c in np.clip(PALETTE[index] + jitter, 0, 255))


def scene_frame(rng, size):
    """The shared pool of text-only classes: a background and 2-4 small random shapes."""
    bg_index, bg = _colour(rng)
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        _, fill = _colour(rng, exclude=bg_index)
        x, y = rng.integers(0, size, size=2)
        r = int(rng.integers(size // 16, size // 5))
        box = [int(x) - r, int(y) - r, int(x) + r, int(y) + r]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)
    return image


def shape_frame(shape, rng, size):
    """A frame-only class's frame: one large shape of its kind, random colours and placement."""
    bg_index, bg = _colour(rng)
    _, fill = _colour(rng, exclude=bg_index)
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    cx, cy = (size / 2 + rng.uniform(-size / 8, size / 8, size=2))
    r = size * rng.uniform(0.25, 0.38)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:                          # cross: two bars
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image


def order_frame(level, size):
    """A disc on a dark background whose radius and brightness grow with level in [0, 1]."""
    image = Image.new("RGB", (size, size), ORDER_BACKGROUND)
    r = size * (0.08 + 0.36 * level)
    colour = tuple(int(c) for c in ORDER_HUE * (60 + 190 * level))
    c = size / 2
    ImageDraw.Draw(image).ellipse([c - r, c - r, c + r, c + r], fill=colour)
    return image


def pattern_frame(kind, rng, size):
    """Two colours in exactly equal areas (every period divides 64), so the mean colour is fixed."""
    y, x = np.mgrid[0:size, 0:size]
    if kind == "hstripes":
        mask = (y // 4) % 2
    elif kind == "vstripes":
        mask = (x // 4) % 2
    elif kind == "checker-fine":
        mask = (x // 4 + y // 4) % 2
    else:
        mask = (x // 16 + y // 16) % 2
    shift = rng.integers(0, 2, size=2) * (4 if kind != "checker-coarse" else 16)
    mask = np.roll(mask, tuple(int(s) for s in shift), axis=(0, 1))   # phase varies, areas do not
    pixels = np.where(mask[..., None] == 1, PATTERN_COLOURS[0], PATTERN_COLOURS[1]).astype(np.uint8)
    return Image.fromarray(pixels)


def order_levels(arrangement, n, rng):
    """n levels drawn i.i.d. uniform, arranged ascending, descending or as a peak (n,)."""
    levels = np.sort(rng.uniform(0, 1, size=n))
    if arrangement == "descending":
        return levels[::-1]
    if arrangement == "peak":          # deal ascending values alternately to the two sides
        left, right = [], []
        first_left = rng.random() < 0.5
        for i, level in enumerate(levels):
            (left if (i % 2 == 0) == first_left else right).append(level)
        return np.array(left + right[::-1])
    return levels


def mix_kinds(k, n, rng):
    """Pattern kinds of a mix-k video: one of its two pairs, each kind n/2 times, shuffled (n,)."""
    pair = MIX_PAIRS[k][int(rng.integers(0, 2))]
    first = int(rng.integers(0, 2))                     # which kind gets the extra frame when n is odd
    kinds = np.array([pair[(i + first) % 2] for i in range(n)])
    rng.shuffle(kinds)
    return kinds


def render_frames(cls, n, rng, size):
    """The n frames of one video of class cls, in time order."""
    if cls.signal == "text-only":
        return [scene_frame(rng, size) for _ in range(n)]
    if cls.signal == "frame-only":
        return [shape_frame(SHAPES[cls.k - 1], rng, size) for _ in range(n)]
    if cls.signal == "order":
        return [order_frame(level, size) for level in order_levels(ORDERS[cls.k], n, rng)]
    return [pattern_frame(PATTERNS[kind], rng, size) for kind in mix_kinds(cls.k, n, rng)]


# ---------------------------------------------------------------- writers

class JsonListWriter:
    """Writes a JSON list one item at a time, so a split never sits in memory."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh, self._first = None, True

    def __enter__(self):
        self._fh = open(self.path, "w", encoding="utf-8")
        self._fh.write("[")
        return self

    def write(self, item):
        self._fh.write(("" if self._first else ",\n") + json.dumps(item, ensure_ascii=False))
        self._first = False

    def __exit__(self, exc_type, *exc):
        if exc_type is None:       # an interrupted list stays unterminated, so no reader takes it as whole
            self._fh.write("]\n")
        self._fh.close()


class _AnswerWriter:
    """The hidden labels of an unlabelled split, `id,category_id` lines; does nothing without a path."""

    def __init__(self, path):
        self.path, self._fh = path, None

    def __enter__(self):
        if self.path is not None:
            self._fh = open(self.path, "w", newline="", encoding="utf-8")
        return self

    def write(self, video_id, category_id):
        if self._fh is not None:
            self._fh.write(f"{video_id},{category_id}\n")

    def __exit__(self, *exc):
        if self._fh is not None:
            self._fh.close()


def _zip_member(zf, name, data):
    zf.writestr(zipfile.ZipInfo(name, date_time=ZIP_DATE), data)


def write_frame_zip(path, images):
    """<id>.zip of 0.jpg, 1.jpg, ... stored uncompressed like the challenge's; returns bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i, image in enumerate(images):
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps pattern colours
            _zip_member(zf, f"{i}.jpg", buf.getvalue())
    return path.stat().st_size


def write_category_map(path, classes):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("category_id", "level1_id", "level1_name", "level2_name"))
        for cls in sorted(classes, key=lambda c: c.category_id):
            writer.writerow((cls.category_id, cls.level1_id, f"group-{cls.level1_id}", cls.name))


def _video_rng(seed, split, index):
    """Each video's own generator: its content does not depend on what was drawn before it."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _video_id(prefix, index, width):
    return f"{prefix}{index:0{width}d}"


# ---------------------------------------------------------------- the demo dataset

def _check_demo_args(n_labelled, n_unlabelled, n_test, n_frames, image_size, tail_ratio, n_classes, n_folds):
    if n_frames < 4:
        raise DemoError(f"n_frames={n_frames}: need at least 4 (order classes need 3 frames or more)")
    if image_size < 32 or image_size % 16:
        raise DemoError(f"image_size={image_size}: need a multiple of 16, at least 32 (pattern periods)")
    if tail_ratio < 1:
        raise DemoError(f"tail_ratio={tail_ratio}: must be >= 1")
    if min(n_unlabelled, n_test) < 0:
        raise DemoError("n_unlabelled and n_test must be >= 0")
    counts = long_tail_counts(n_labelled, n_classes, tail_ratio)
    if counts.min() < n_folds + 1:
        raise DemoError(f"n_labelled={n_labelled}: the smallest of {n_classes} classes would get "
                        f"{counts.min()} items; {n_folds}-fold CV needs {n_folds + 1}, so raise n_labelled")
    return counts


def _split_labels(counts, n, labelled, rng):
    """Class index of each video of a split (n,): exact long-tail counts for the labelled split,
    draws from the same prior for the others."""
    if labelled:
        labels = np.repeat(np.arange(len(counts)), counts)
        rng.shuffle(labels)
        return labels
    return rng.choice(len(counts), size=n, p=counts / counts.sum())


def _write_demo_split(out_dir, split, labels, classes, id_offset, n_frames, image_size, seed,
                      labelled, progress):
    """Streams one split's videos to disk; returns its counts (videos, frames, bytes, per class)."""
    min_frames = max(3, n_frames // 2)
    frame_total, bytes_total, class_counts = 0, 0, {c.category_id: 0 for c in classes}
    answers_path = None if labelled else out_dir / "answers" / f"{split}.csv"
    with JsonListWriter(out_dir / "annotations" / f"{split}.json") as ann, _AnswerWriter(answers_path) as answers:
        for i, label in enumerate(tqdm(labels, desc=f"demo {split}", disable=not progress)):
            cls, rng = classes[label], _video_rng(seed, split, i)
            vid = _video_id("d", id_offset + i, 6)
            n = int(rng.integers(min_frames, n_frames + 1))   # same distribution for every class
            entry = {"id": vid, **make_text(cls, rng)}
            if labelled:
                entry["category_id"] = cls.category_id
            answers.write(vid, cls.category_id)
            ann.write(entry)
            zip_path = out_dir / "zip_frames" / split / vid[-3:] / f"{vid}.zip"
            bytes_total += write_frame_zip(zip_path, render_frames(cls, n, rng, image_size))
            frame_total += n
            class_counts[cls.category_id] += 1
    return {"n_videos": len(labels), "n_frames": frame_total, "zip_bytes": bytes_total,
            "class_counts": class_counts}


def generate_demo_dataset(out_dir, n_labelled=400, n_unlabelled=100, n_test=100, n_frames=8,
                          image_size=64, seed=0, tail_ratio=12.0, n_folds=5, progress=True):
    """Writes the demo dataset under out_dir and returns (and saves as summary.json) its summary.

    Layout: annotations/{labeled,unlabeled,test}.json, zip_frames/<split>/<id[-3:]>/<id>.zip
    (JPEGs 0.jpg..), category_map.csv, answers/{unlabeled,test}.csv (the hidden labels: id,category_id),
    summary.json. Each video has between max(3, n_frames // 2) and n_frames frames. The smallest class
    gets at least n_folds + 1 labelled videos, so every fold model sees it. The defaults
    write 600 videos and 3,587 frames (about 2 minutes of EfficientNet-Lite0 at 30 images/s) in ~2 s.
    """
    out_dir = Path(out_dir)
    classes = demo_classes()
    counts = _check_demo_args(n_labelled, n_unlabelled, n_test, n_frames, image_size, tail_ratio,
                              len(classes), n_folds)
    for sub in ("annotations", "zip_frames", "answers"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)      # a stale split must not survive
        (out_dir / sub).mkdir(parents=True)
    write_category_map(out_dir / "category_map.csv", classes)
    label_rng = np.random.default_rng([seed, 99])
    splits, offset = {}, 0
    for split, n, labelled in ((LABELLED_SPLIT, n_labelled, True), ("unlabeled", n_unlabelled, False),
                               ("test", n_test, False)):
        labels = _split_labels(counts, n, labelled, label_rng)
        splits[split] = _write_demo_split(out_dir, split, labels, classes, offset, n_frames,
                                          image_size, seed, labelled, progress)
        offset += n
    summary = _demo_summary(out_dir, classes, counts, splits, n_frames, image_size, seed, tail_ratio)
    write_json(out_dir / "summary.json", summary)        # last: the dataset is whole when it exists
    return summary


def _demo_summary(out_dir, classes, counts, splits, n_frames, image_size, seed, tail_ratio):
    groups = {}
    for cls in classes:
        groups.setdefault(cls.signal, []).append(cls.category_id)
    return {
        "layout": "zip_frames",
        "out_dir": str(out_dir),
        "config": {"n_frames": n_frames, "image_size": image_size, "seed": seed, "tail_ratio": tail_ratio,
                   "min_frames": max(3, n_frames // 2)},
        "classes": [{"category_id": c.category_id, "level1_id": c.level1_id, "name": c.name,
                     "signal": c.signal, "n_labeled": int(n)} for c, n in zip(classes, counts)],
        "signal_groups": groups,
        "signal_meaning": {
            "text-only": "frames from one shared pool of scenes; title/ASR keywords name the class",
            "frame-only": "shared neutral text; each frame shows the class's shape",
            "order": "same frame multiset distribution; ascending, descending or peak order",
            "mix": "same per-frame kind marginals and mean colour; the class says which two kinds co-occur",
        },
        "long_tail_ratio": float(counts.max() / counts.min()),
        "splits": splits,
        "total_frames": int(sum(s["n_frames"] for s in splits.values())),
    }


# ---------------------------------------------------------------- the preliminary (feature zip) layout

def _frame_count(rng, n_frames):
    """Three videos in four are full length; the rest are shorter (1 .. n_frames-1 frames)."""
    if n_frames == 1 or rng.random() < 0.75:
        return n_frames
    return int(rng.integers(1, n_frames))


def _feature_text(category_id, rng):
    """Neutral words; half the titles also name the class with one token (weak text signal)."""
    title = _words(rng, 3, 10)
    if category_id is not None and rng.random() < 0.5:
        title = _insert_keyword(rng, title, [f"topic{category_id}"])
    return {"title": " ".join(title), "asr": " ".join(_words(rng, 0, 12)), "ocr": []}


def _npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def generate_feature_zip_dataset(out_dir, n_videos, n_frames=32, dim=768, split="test", n_classes=200,
                                 seed=0, with_labels=True, signal=0.1, tail_ratio=100.0, progress=True):
    """Writes out_dir/zip_feats/<split>.zip (<id>.npy float16 (n_frames_i, dim), n_frames_i <= n_frames)
    and out_dir/annotations/<split>.json over n_classes classes of the challenge's 200-class map with a
    Zipf long tail; without labels the hidden ones go to out_dir/answers/<split>.csv. Frame features
    are signal * class centroid + N(0, 1) noise, so a model has something to learn. One video is in
    memory at a time. Returns the summary (also saved as out_dir/summary_<split>.json).
    """
    category_map = load_category_map()
    if not 1 <= n_classes <= category_map.n_fine:
        raise DemoError(f"n_classes={n_classes}: must be between 1 and {category_map.n_fine} (the map's classes)")
    if n_videos < 1 or n_frames < 1 or dim < 1:
        raise DemoError(f"n_videos={n_videos}, n_frames={n_frames}, dim={dim}: all must be >= 1")
    out_dir, started = Path(out_dir), time.perf_counter()
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 2**32 - 1])
    class_ids = [category_map.fine_ids[i] for i in rng.permutation(category_map.n_fine)[:n_classes]]
    counts = long_tail_counts(n_videos, n_classes, tail_ratio)            # (n_classes,) head first
    labels = np.repeat(np.arange(n_classes), counts)                       # (n_videos,)
    rng.shuffle(labels)
    centroids = rng.standard_normal((n_classes, dim), dtype=np.float32) * signal   # (n_classes, dim)
    for sub in ("zip_feats", "annotations", "answers"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUILTIN_MAP, out_dir / "category_map.csv")
    totals = _write_feature_split(out_dir, split, labels, class_ids, centroids, n_frames, seed,
                                  with_labels, progress)
    summary = {
        "layout": "zip_feats", "out_dir": str(out_dir), "split": split,
        "config": {"n_videos": n_videos, "n_frames": n_frames, "dim": dim, "n_classes": n_classes,
                   "seed": seed, "with_labels": with_labels, "signal": signal, "tail_ratio": tail_ratio},
        "n_videos": n_videos, **totals,
        "largest_class": int(counts.max()), "smallest_class": int(counts.min()),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / f"summary_{split}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _write_feature_split(out_dir, split, labels, class_ids, centroids, n_frames, seed, with_labels,
                         progress):
    frame_total, zip_path = 0, out_dir / "zip_feats" / f"{split}.zip"
    answers_path = None if with_labels else out_dir / "answers" / f"{split}.csv"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
            JsonListWriter(out_dir / "annotations" / f"{split}.json") as ann, _AnswerWriter(answers_path) as answers:
        for i, label in enumerate(tqdm(labels, desc=f"features {split}", disable=not progress)):
            rng, vid, category_id = _video_rng(seed, split, i), _video_id(split[0], i, 7), class_ids[label]
            n = _frame_count(rng, n_frames)
            noise = rng.standard_normal((n, centroids.shape[1]), dtype=np.float32)
            frames = (centroids[label] + noise).astype(np.float16)         # (n, dim)
            _zip_member(zf, f"{vid}.npy", _npy_bytes(frames))
            entry = {"id": vid, **_feature_text(category_id, rng)}
            if with_labels:
                entry["category_id"] = category_id
            answers.write(vid, category_id)
            ann.write(entry)
            frame_total += n
    return {"n_frames": frame_total, "zip_bytes": zip_path.stat().st_size}
