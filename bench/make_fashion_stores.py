"""Build the two fashion feature stores the quality benchmarks read (full and masked titles).

    python -m bench make_fashion_stores [--data ../shared/data/fashion] [--out bench_cache]

The images are the same in both variants, so the full-title store is extracted from the JPEG zips
and the masked-title store reuses its frame embeddings through the preliminary layout (one zip of
<id>.npy float16 [1, D]), which `extract` reads without running the frame encoder again.
"""
import argparse
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from bench.common import REPO, cache_dir, data_dir
from features.store import StoreReader

BENCHMARK = {"kind": "data", "summary": "the fashion full- and masked-title stores (and the photos' embeddings for the protocols)"}


def run(args):
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, str(REPO / "run.py")] + args, check=True)


def export_frames(store_path, feats_root, annotations):
    """The full store's frame embeddings as DATA/zip_feats/labeled.zip, beside masked annotations."""
    store = StoreReader(store_path)
    (feats_root / "annotations").mkdir(parents=True, exist_ok=True)
    (feats_root / "zip_feats").mkdir(exist_ok=True)
    shutil.copy(annotations, feats_root / "annotations" / "labeled.json")
    ids = store.ids                                                    # (N,) read once
    with zipfile.ZipFile(feats_root / "zip_feats" / "labeled.zip", "w") as zf:
        for start in range(0, store.n, 1024):
            rows = slice(start, min(start + 1024, store.n))
            frame_emb, frame_mask = store.read("frame_emb", rows), store.read("frame_mask", rows)
            for vid, emb, mask in zip(ids[rows], frame_emb, frame_mask):
                buf = io.BytesIO()
                np.save(buf, emb[mask])                          # [n_frames, D] float16
                zf.writestr(f"{vid}.npy", buf.getvalue())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench make_fashion_stores", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="[default: BENCH_DATA/fashion]")
    parser.add_argument("--out", default=None, help="[default: BENCH_CACHE]")
    parser.add_argument("--workers", default="1")
    args = parser.parse_args(argv)
    args.data, args.out = args.data or str(data_dir("fashion")), args.out or str(cache_dir())
    data, out = Path(args.data), Path(args.out)
    cmap = str(data / "category_map.csv")
    common = ["--split", "labeled", "--category-map", cmap, "--frames", "1", "--workers", args.workers]
    run(["extract", "--data", str(data), "--out", str(out / "fashion_full")] + common)
    feats_root = out / "fashion_masked_data"
    export_frames(out / "fashion_full" / "labeled.h5", feats_root, data / "annotations" / "labeled_masked.json")
    run(["extract", "--data", str(feats_root), "--out", str(out / "fashion_masked")] + common)
    print(json.dumps({"full": str(out / "fashion_full"), "masked": str(out / "fashion_masked")}))


if __name__ == "__main__":
    main()
