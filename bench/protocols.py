"""Data directories for the quality protocols: a split of labelled items laid out as the challenge's
preliminary round (frame features in a zip of <id>.npy), with the hidden labels kept aside.

    python -m bench protocols fashion --protocol heldout --titles masked --out bench_cache/heldout_masked
    python -m bench protocols fashion --protocol tail --titles masked --out bench_cache/tail_masked
    python -m bench protocols fashion --protocol semi --titles full --out bench_cache/semi_full
    python -m bench protocols ucf14 --out bench_cache/heldout_ucf14

Each writes OUT_data/ (annotations/<split>.json, zip_feats/<split>.zip, category_map.csv,
answers/<split>.csv for the splits whose labels are hidden, protocol.json) and then runs the real
`python run.py extract` into OUT/ (reads the .npy features: no frame encoder runs).

Protocols:
- fashion `heldout` (issue 13): per class a seeded round(20%) of the items as split `test` (labels
  hidden); the rest `labeled`. Classes with one or two items stay wholly labelled.
- fashion `tail` (issue 21): a seeded 20% of all items drawn at random, not per class, as split `test`;
  a class whose every item was drawn keeps one labelled. The test split's priors are the draw's own, not
  the labelled split's (a sampling shift, as a real split has), and more classes have no test item (seed
  0: 16 of 74, classes of 1-9 items, against `heldout`'s 12 of 1-2 items): a label put into one of them
  adds a class of F1 0 to the challenge's macro-F1 (it runs over the classes in the truth or the predictions).
- fashion `semi` (issue 10; ../shared/BENCHMARKS.md's semi-supervised reference): per class a seeded
  round(20%), at least one, `labeled` (1,543 items); the other 80% as split `unlabeled` (labels hidden).
- ucf14 `heldout` (issue 13): per class one run of consecutive ids (about 25% of the class) as split
  `test`. Ids follow class, actor group, clip, so a run is whole actors when its two ends fall where
  the actor changes: each end is moved to the neighbouring boundary where the mean frames of the two
  clips either side are least alike (a clip of the same actor and scene is near-identical).

The fashion frame features come from bench/make_fashion_stores.py's export
(CACHE/fashion_masked_data/zip_feats/labeled.zip, the EfficientNet-Lite0 embedding of each photo),
so the photos are encoded once for every protocol.
"""
import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.common import REPO, cache_dir as bench_cache, data_dir as shared_data

BENCHMARK = {"kind": "data", "summary": "protocol data (held-out, semi-supervised, ucf14 unseen actors): the split laid out as the challenge's, hidden labels aside, then extract"}
TITLE_FILES = {"full": "labeled.json", "masked": "labeled_masked.json"}


def read_records(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def round_half_up(x):
    return int(np.floor(x + 0.5))


def by_class(labels):
    """{class: row indices (n_c,)} in row order."""
    rows = defaultdict(list)
    for i, c in enumerate(labels):
        rows[c].append(i)
    return {c: np.asarray(r) for c, r in sorted(rows.items())}


def stratified_pick(labels, frac, seed, at_least=0):
    """(N,) bool: per class a seeded round(frac * n_c) rows (at least `at_least`, at most n_c)."""
    rng = np.random.default_rng(seed)
    picked = np.zeros(len(labels), bool)
    for c, rows in by_class(labels).items():
        k = min(len(rows), max(at_least, round_half_up(frac * len(rows))))
        picked[rng.permutation(rows)[:k]] = True
    return picked


def heldout_split(labels, frac=0.2, seed=0):
    """(N,) bool test mask: stratified frac held out; a class keeps round((1 - frac) n_c) >= 1 labelled."""
    return stratified_pick(labels, frac, seed)


def tail_split(labels, frac=0.2, seed=0):
    """(N,) bool test mask: a seeded round(frac N) of all rows at random (the classes' shares in the test
    split are the draw's); a class drawn whole gives its first drawn row back, so each keeps one labelled."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))                                  # (N,) the draw
    test = np.zeros(len(labels), bool)
    test[order[:round_half_up(frac * len(labels))]] = True
    for c, rows in by_class(labels).items():
        if test[rows].all():
            test[order[np.isin(order, rows)][0]] = False
    return test


def semi_split(labels, frac=0.2, seed=0):
    """(N,) bool labelled mask: per class round(frac n_c), at least one, labelled; the rest unlabelled."""
    return stratified_pick(labels, frac, seed, at_least=1)


def run_boundary(similarity, target, window):
    """Boundary index b in [0, n] (a cut between rows b-1 and b) near `target` where the clips either
    side are least alike. similarity (n-1,): cosine of consecutive clips' mean frames; the ends of the
    class (0 and n) are natural boundaries (similarity -inf)."""
    n = len(similarity) + 1
    lo, hi = max(0, target - window), min(n, target + window)
    edge = np.concatenate([[-np.inf], similarity, [-np.inf]])          # (n+1,) per boundary
    return lo + int(np.argmin(edge[lo:hi + 1]))


def runs_split(ids, labels, mean_frames, frac=0.25, seed=0, window=4):
    """(N,) bool test mask: per class one run of consecutive ids, about frac of the class, whose ends
    sit at actor changes (see module doc). ids sort numerically within a class.

    mean_frames (N, D): each video's mean frame feature. Returns (mask, {class: details}).
    """
    rng = np.random.default_rng(seed)
    test = np.zeros(len(ids), bool)
    details = {}
    for c, rows in by_class(labels).items():
        rows = rows[np.argsort([int("".join(ch for ch in ids[r] if ch.isdigit())) for r in rows])]
        emb = mean_frames[rows] / np.linalg.norm(mean_frames[rows], axis=1, keepdims=True)
        sim = (emb[1:] * emb[:-1]).sum(axis=1)                           # (n_c - 1,)
        n, k = len(rows), round_half_up(frac * len(rows))
        start = run_boundary(sim, int(rng.integers(0, n - k + 1)), window)
        end = run_boundary(sim, min(n, start + k), window)
        if end <= start:
            end = min(n, start + k)
        test[rows[start:end]] = True
        details[c] = {"n": n, "first": ids[rows[start]], "last": ids[rows[end - 1]], "n_test": end - start,
                      "cut_similarity": [float(sim[b - 1]) if 0 < b < n else None for b in (start, end)],
                      "median_neighbour_similarity": float(np.median(sim))}
    return test, details


def copy_members(src_zip, dst_zip, ids):
    """<id>.npy of each id from src_zip into a new dst_zip, member by member (no decoding)."""
    dst_zip.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src_zip) as src, zipfile.ZipFile(dst_zip, "w") as dst:
        for vid in ids:
            info = src.getinfo(f"{vid}.npy")
            dst.writestr(info, src.read(info))


def write_dataset(out, splits, hidden, feats_zip, category_map, protocol):
    """Write the preliminary layout for splits {name: [records]} into `out`; the splits in `hidden` lose
    category_id (kept in answers/<split>.csv, `id,category_id` lines, no header, as demo/ writes)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "annotations").mkdir(parents=True)
    shutil.copyfile(category_map, out / "category_map.csv")
    for name, records in splits.items():
        if name in hidden:
            (out / "answers").mkdir(exist_ok=True)
            with open(out / "answers" / f"{name}.csv", "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh, lineterminator="\n").writerows((r["id"], r["category_id"]) for r in records)
            records = [{k: v for k, v in r.items() if k != "category_id"} for r in records]
        with open(out / "annotations" / f"{name}.json", "w", encoding="utf-8") as fh:
            json.dump(records, fh, ensure_ascii=False)
        copy_members(feats_zip, out / "zip_feats" / f"{name}.zip", [r["id"] for r in records])
    counts = {name: len(records) for name, records in splits.items()}
    with open(out / "protocol.json", "w", encoding="utf-8") as fh:
        json.dump({**protocol, "splits": counts, "hidden": sorted(hidden)}, fh, indent=1)
    return counts


def read_answers(path):
    """{id: category_id} from answers/<split>.csv."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {row[0]: row[1] for row in csv.reader(fh) if row}


def fashion_feats():
    """make_fashion_stores' export of the photos' embeddings, under BENCH_CACHE."""
    return bench_cache("fashion_masked_data", "zip_feats", "labeled.zip")


def fashion_dataset(out, protocol, titles, seed=0, data=None, feats_zip=None):
    """Fashion items split by `protocol` ('heldout' or 'semi') with `titles` ('full' or 'masked');
    data: the fashion data (default BENCH_DATA/fashion), feats_zip: its frame features (fashion_feats())."""
    data, feats_zip = data or shared_data("fashion"), feats_zip or fashion_feats()
    records = read_records(Path(data) / "annotations" / TITLE_FILES[titles])
    labels = [r["category_id"] for r in records]
    if protocol in ("heldout", "tail"):
        test = (heldout_split if protocol == "heldout" else tail_split)(labels, 0.2, seed)
        splits = {"labeled": [r for r, t in zip(records, test) if not t],
                  "test": [r for r, t in zip(records, test) if t]}
        hidden = {"test"}
    elif protocol == "semi":
        lab = semi_split(labels, 0.2, seed)
        splits = {"labeled": [r for r, t in zip(records, lab) if t],
                  "unlabeled": [r for r, t in zip(records, lab) if not t]}
        hidden = {"unlabeled"}
    else:
        raise ValueError(f"unknown protocol {protocol!r} (heldout, tail or semi)")
    meta = {"dataset": "fashion", "protocol": protocol, "titles": titles, "seed": seed,
            "source": str(data), "frame_features": str(feats_zip)}
    return write_dataset(out, splits, hidden, feats_zip, Path(data) / "category_map.csv", meta)


def mean_frames_of(feats_zip, ids):
    """(N, D) float32 mean frame of each <id>.npy."""
    with zipfile.ZipFile(feats_zip) as zf:
        return np.stack([np.load(io.BytesIO(zf.read(f"{v}.npy"))).astype(np.float32).mean(axis=0) for v in ids])


def ucf14_dataset(out, seed=0, frac=0.25, data=None):
    """ucf14 (default BENCH_DATA/ucf14) with one run of whole actors per class held out as split `test`."""
    data = Path(data or shared_data("ucf14"))
    feats_zip = data / "zip_feats" / "labeled.zip"
    records = read_records(data / "annotations" / "labeled.json")
    ids, labels = [r["id"] for r in records], [r["category_id"] for r in records]
    test, details = runs_split(ids, labels, mean_frames_of(feats_zip, ids), frac, seed)
    splits = {"labeled": [r for r, t in zip(records, test) if not t],
              "test": [r for r, t in zip(records, test) if t]}
    meta = {"dataset": "ucf14", "protocol": "heldout-runs", "seed": seed, "frac": frac,
            "source": str(data), "runs": details}
    return write_dataset(out, splits, {"test"}, feats_zip, data / "category_map.csv", meta)


def extract(data_dir, cache, frames=None, workers=1):
    """The real `python run.py extract` of every split of data_dir into cache."""
    cmd = [sys.executable, str(REPO / "run.py"), "extract", "--data", str(data_dir), "--out", str(cache),
           "--category-map", str(Path(data_dir) / "category_map.csv"), "--workers", str(workers)]
    if frames:
        cmd += ["--frames", str(frames)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def data_dir_of(cache_dir):
    """The protocol's data directory beside its cache: CACHE_data."""
    return Path(str(Path(cache_dir)) + "_data")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench protocols", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["fashion", "ucf14"])
    parser.add_argument("--protocol", choices=["heldout", "tail", "semi"], default="heldout",
                        help="fashion only (ucf14 is always its held-out runs)")
    parser.add_argument("--titles", choices=["full", "masked"], default="masked")
    parser.add_argument("--out", required=True, help="cache directory; the data goes to OUT_data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="the dataset's directory [default: BENCH_DATA/<dataset>]")
    parser.add_argument("--feats-zip", default=None, help="fashion frame features (<id>.npy zip) [default: "
                        "BENCH_CACHE/fashion_masked_data/zip_feats/labeled.zip, from make_fashion_stores]")
    parser.add_argument("--frames", type=int, help="frames kept per item by extract (default: 1 for fashion, "
                                                   "every frame for ucf14)")
    parser.add_argument("--no-extract", action="store_true")
    args = parser.parse_args(argv)
    data_dir = data_dir_of(args.out)
    if args.dataset == "fashion":
        counts = fashion_dataset(data_dir, args.protocol, args.titles, args.seed, data=args.data,
                                 feats_zip=args.feats_zip and Path(args.feats_zip))
    else:
        counts = ucf14_dataset(data_dir, args.seed, data=args.data)
    print(json.dumps({"data": str(data_dir), "splits": counts}), flush=True)
    if not args.no_extract:
        extract(data_dir, args.out, frames=args.frames or (1 if args.dataset == "fashion" else None))


if __name__ == "__main__":
    main()
