"""Do the demo dataset's planted signals survive the frozen default encoders?

    PYTHONPATH=. python bench/check_demo_signals.py [--per-class 20] [--seed 0]

Generates the demo dataset (generate_demo_dataset defaults), embeds up to --per-class labelled videos
of each class with EfficientNet-Lite0 (frames) and MiniLM (title + OCR + ASR), and prints, per signal
group, the out-of-fold balanced accuracy (3 stratified folds) of simple probes on those embeddings:
a linear model and a small MLP on text, on mean-pooled frames, on the first frame, on the first and
last frames (order), and on which pairs of k-means frame clusters co-occur (mixture). Chance is
1 / (classes in the group). Single-threaded: it shares the machine.
"""
import argparse
import io
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from features.encoders import build_frame_encoder, build_text_encoder
from demo.synthetic import generate_demo_dataset


def probes():
    return {"linear": make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)),
            "mlp": make_pipeline(StandardScaler(), MLPClassifier((64,), alpha=1e-2, max_iter=2000, random_state=0))}


def cv_accuracy(model, X, y):
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    return balanced_accuracy_score(y, cross_val_predict(model, X, y, cv=folds))


def embed_frames(encoder, zip_path):
    """(n, D) embeddings of one video's frames, in time order."""
    with zipfile.ZipFile(zip_path) as zf:
        images = [Image.open(io.BytesIO(zf.read(n))).convert("RGB") for n in zf.namelist()]
    return encoder.encode(torch.stack([encoder.preprocess(im) for im in images])).numpy()


def embed_texts(encoder, entries):
    """(N, Dt) pooled embeddings of 'title ocr asr'."""
    texts = [" ".join([e["title"], *(o["text"] for o in e["ocr"]), e["asr"]]) for e in entries]
    batch = encoder.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return encoder.encode(batch["input_ids"], batch["attention_mask"])[1].numpy()


def pair_presence(frame_embs, seed):
    """(N, 6) which pairs of 4 k-means clusters of frames co-occur in each video."""
    km = KMeans(4, n_init=4, random_state=seed).fit(np.concatenate(frame_embs))
    present = np.stack([np.bincount(km.predict(e), minlength=4) > 0 for e in frame_embs]).astype(float)
    return np.stack([np.outer(p, p)[np.triu_indices(4, 1)] for p in present])


def group_features(entries, frame_embs, text_emb, signal, seed):
    feats = {"text": text_emb,
             "frames mean-pooled": np.stack([e.mean(0) for e in frame_embs]),
             "first frame": np.stack([e[0] for e in frame_embs]),
             "first+last frames": np.stack([np.hstack([e[0], e[-1]]) for e in frame_embs])}
    if signal == "mix":
        feats["cluster pairs present"] = pair_presence(frame_embs, seed)
    return feats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20, help="most labelled videos embedded per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="demo_signals_"))
    summary = generate_demo_dataset(out, seed=args.seed, progress=False)
    frame_encoder, text_encoder = build_frame_encoder("efficientnet-lite0"), build_text_encoder("minilm")
    entries = json.loads((out / "annotations" / "labeled.json").read_text())
    print(f"command: PYTHONPATH=. python {' '.join(sys.argv)}")
    print(f"dataset {out}: {summary['total_frames']} frames in all; probes on <= {args.per_class} videos a class")
    print(f"{'group':<11} {'classes':>7} {'videos':>6}  {'features':<22} {'linear':>6} {'mlp':>6}")
    for signal, ids in summary["signal_groups"].items():
        rows = [e for e in entries if e["category_id"] in ids]
        rows = [e for k in ids for e in [r for r in rows if r["category_id"] == k][: args.per_class]]
        y = np.array([ids.index(e["category_id"]) for e in rows])
        started = time.perf_counter()
        with torch.inference_mode():
            frame_embs = [embed_frames(frame_encoder, out / "zip_frames" / "labeled" / e["id"][-3:] / f"{e['id']}.zip")
                          for e in rows]
            text_emb = embed_texts(text_encoder, rows)
        for name, X in group_features(rows, frame_embs, text_emb, signal, args.seed).items():
            with threadpool_limits(1):
                scores = {p: cv_accuracy(model, X, y) for p, model in probes().items()}
            print(f"{signal:<11} {len(ids):>7} {len(rows):>6}  {name:<22} {scores['linear']:>6.2f} {scores['mlp']:>6.2f}")
        print(f"{'':<11} chance {1 / len(ids):.2f}; embedded in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
