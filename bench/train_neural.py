"""Benchmarks of train-neural. Every figure printed here is measured in the same run.

    fashion  each model's out-of-fold challenge metric and seconds per epoch on one or more cached
             stores (the fashion full- and masked-title stores), beside a logistic regression on
             [mean-pooled frame, pooled title] embeddings over the same folds.
    options  the regularisers (label smoothing, class-balanced weights, EMA, FGM, R-Drop), each
             switched on alone over an all-off baseline, and all of them together; OOF metric per model.
    scale    seconds per epoch and peak memory (RSS, each model in its own process) on N generated
             videos written to a temporary store, streaming.

    PYTHONPATH=. python bench/bench_neural.py fashion --cache /work/cache/fashion_masked \
        --cache /work/cache/fashion_full
    PYTHONPATH=. python bench/bench_neural.py options --cache /work/cache/fashion_masked --models mlp
    PYTHONPATH=. python bench/bench_neural.py scale --n 100000
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from features import schema
from features.store import StoreReader
from neural.folds import load_folds
from neural.metrics import metric_from_proba
from neural.options import NeuralOptions
from neural.pipeline import labelled_rows, train_neural

COLUMNS = ("mean", "l2_micro", "l2_macro", "l1_micro", "l1_macro")


def row(name, metrics, extra=""):
    return f"| {name} | " + " | ".join(f"{metrics[k]:.4f}" for k in COLUMNS) + f" | {extra} |"


def header(first):
    return f"| {first} | " + " | ".join(COLUMNS) + " | s/epoch |\n|" + "---|" * (len(COLUMNS) + 2)


# ------------------------------------------------------------------ logistic-regression reference


def mean_frame_and_title(reader, rows, batch=1024):
    """(len(rows), D + Dt): masked mean of frame_emb and the pooled title, read in row batches."""
    parts = []
    for start in range(0, len(rows), batch):
        r = rows[start:start + batch]
        frames = reader.read(schema.FRAME_EMB, r).astype(np.float32)            # (b, F, D)
        mask = reader.read(schema.FRAME_MASK, r)[..., None]                     # (b, F, 1)
        mean = (frames * mask).sum(1) / np.maximum(mask.sum(1), 1)
        title = reader.read(schema.TEXT_POOLED, r)[:, 0].astype(np.float32)   # (b, Dt)
        parts.append(np.concatenate([mean, title], 1))
    return np.concatenate(parts)


def logistic_oof(cache_dir, run_dir):
    """OOF metric of StandardScaler + LogisticRegression on the run's own folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    reader = StoreReader(schema.store_path(cache_dir, "labeled"))
    rows, _, labels = labelled_rows(reader)
    x, y = mean_frame_and_title(reader, rows), labels[rows]
    _, fold, n_folds, _ = load_folds(Path(run_dir) / "folds.h5")
    oof = np.zeros((len(y), len(reader.fine_classes)), np.float32)
    start = time.perf_counter()
    for k in range(n_folds):
        train, held = fold != k, fold == k
        lr = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=500)).fit(x[train], y[train])
        oof[np.ix_(held, lr[-1].classes_)] = lr.predict_proba(x[held])
    return metric_from_proba(y, oof, reader.fine_to_coarse), time.perf_counter() - start


# ------------------------------------------------------------------ fashion


def bench_fashion(args):
    opts = NeuralOptions(n_folds=args.folds, epochs=args.epochs, threads=args.threads)
    for cache in args.cache:
        run_dir = Path(args.out) / Path(cache).name
        print(f"\n## {cache} ({args.folds} folds, {args.epochs} epochs, {args.threads} thread(s)) -> {run_dir}")
        results = train_neural(cache, run_dir, args.models.split(","), opts)
        lr_metrics, lr_seconds = logistic_oof(cache, run_dir)
        print(header("model"))
        print(row("logistic regression, [mean frame, title]", lr_metrics, f"{lr_seconds / args.folds:.1f} per fold"))
        for name, m in results.items():
            print(row(name, m["oof"], f"{np.mean(m['seconds_per_epoch']):.1f}"), flush=True)


# ------------------------------------------------------------------ options


REGULARISERS = {"label_smoothing": dict(label_smoothing=0.1), "class_balanced": dict(class_balanced=True),
                "ema": dict(ema=True), "fgm": dict(fgm=True), "rdrop": dict(rdrop=True)}
ALL_OFF = dict(label_smoothing=0.0, class_balanced=False, ema=False, fgm=False, rdrop=False)


def bench_options(args):
    base = NeuralOptions(n_folds=args.folds, epochs=args.epochs, threads=args.threads, **ALL_OFF)
    variants = {"all off": {}, **{f"+ {k}": v for k, v in REGULARISERS.items()}}
    variants["all on"] = {k: v for d in REGULARISERS.values() for k, v in d.items()}
    variants["defaults"] = {k: getattr(NeuralOptions(), k) for k in ALL_OFF}
    for cache in args.cache:
        print(f"\n## {cache}: regularisers ({args.folds} folds, {args.epochs} epochs)")
        print(header("model, options"))
        for name, change in variants.items():
            out = Path(args.out) / "options" / Path(cache).name / name.replace(" ", "_").replace("+", "plus")
            results = train_neural(cache, out, args.models.split(","), replace(base, **change))
            for model, m in results.items():
                print(row(f"{model}, {name}", m["oof"], f"{np.mean(m['seconds_per_epoch']):.1f}"), flush=True)


# ------------------------------------------------------------------ scale


def write_generated_store(path, n, n_classes, n_frames, frame_dim, text_dim, n_tokens, batch=2000, seed=0):
    """A complete store of n generated videos with class signal, written batch by batch."""
    from features.store import StoreDims, StoreWriter, create_store
    from tests.fakes import fake_category_map
    rng = np.random.default_rng(seed)
    cmap = fake_category_map(n_classes, max(2, n_classes // 10))
    label = rng.integers(0, n_classes, n)
    create_store(path, "labeled", [f"v{i:07d}" for i in range(n)], label, cmap.fine_to_coarse[label],
                 StoreDims(n_frames, frame_dim, text_dim, n_tokens), {"generated": True}, cmap)
    frame_centres = rng.normal(size=(n_classes, frame_dim)).astype(np.float32)
    text_centres = rng.normal(size=(n_classes, text_dim)).astype(np.float32)
    writer = StoreWriter(path)
    for start in range(0, n, batch):
        y = label[start:start + batch]
        b = len(y)
        frame_mask = np.arange(n_frames)[None] < rng.integers(1, n_frames + 1, (b, 1))
        token_mask = np.arange(n_tokens)[None] < rng.integers(4, n_tokens + 1, (b, 1))
        frames = frame_centres[y][:, None] + rng.normal(size=(b, n_frames, frame_dim)).astype(np.float32) * 2
        tokens = text_centres[y][:, None] + rng.normal(size=(b, n_tokens, text_dim)).astype(np.float32) * 2
        writer.write_rows(start, {
            schema.FRAME_EMB: (frames * frame_mask[..., None]).astype(np.float16),
            schema.FRAME_MASK: frame_mask,
            schema.TEXT_POOLED: (text_centres[y][:, None] + rng.normal(size=(b, 3, text_dim))).astype(np.float16),
            schema.TEXT_FIELD_MASK: np.ones((b, 3), bool),
            schema.TEXT_LEN: np.full((b, 3), 20, np.int32),
            schema.TEXT_TOKENS: (tokens * token_mask[..., None]).astype(np.float16),
            schema.TEXT_TOKEN_MASK: token_mask,
        })
    writer.mark_complete()
    writer.close()


def peak_rss_mb():
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale_worker(args):
    """One model, one epoch on every row of the store (no folds): seconds and peak RSS of this process."""
    from features.codebook import Codebook
    from features.device import resolve_device
    from neural.data import StoreBatches
    from neural.models import model_entry, model_inputs
    from neural.spec import spec_from_store
    from neural.train import fit_fold
    torch.set_num_threads(args.threads)
    imports_mb = peak_rss_mb()                     # torch, sklearn, h5py: before any data is read
    reader = StoreReader(schema.store_path(args.cache[0], "labeled"))
    opts = NeuralOptions(epochs=1, threads=args.threads)
    names = model_inputs(args.models, reader)
    rows, _, labels = labelled_rows(reader)
    if args.rows:       # a seeded random subset, so reads stay scattered over the whole file
        rows = np.sort(np.random.default_rng(0).choice(rows, args.rows, replace=False))
    dataset = StoreBatches(reader, names, labels, reader.fine_to_coarse, opts.max_tokens)
    codebook = Codebook.load(Path(args.cache[0]) / "codebook.h5") if model_entry(args.models).needs_codebook else None
    spec = spec_from_store(args.models, reader, opts, names, codebook)
    _, info = fit_fold(spec, dataset, rows, opts, 0, resolve_device(), codebook)
    peak_mb = peak_rss_mb()
    print(json.dumps({"seconds": info["seconds_per_epoch"][0], "rows": len(rows), "peak_rss_mb": peak_mb,
                      "imports_rss_mb": imports_mb}))


def bench_scale(args):
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        run_scale(args, args.dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run_scale(args, tmp)


def run_scale(args, folder):
    """Generate (or reuse, when --dir holds a complete one of the same size) the store, then time."""
    path = Path(folder) / "labeled.h5"
    start = time.perf_counter()
    reuse = path.exists() and StoreReader(path, require_complete=False).attrs.get("complete") \
        and len(StoreReader(path)) == args.n
    if not reuse:
        write_generated_store(path, args.n, 200, args.frames, args.frame_dim, args.text_dim, args.tokens)
    if args.aggregates and not StoreReader(path).attrs.get("aggregates_complete"):
        from features.aggregates import run_aggregates
        run_aggregates(folder, ["labeled"])
    size_gb = path.stat().st_size / 1e9
    print(f"\n## scale: {args.n} generated videos, F={args.frames} x D={args.frame_dim} frames, "
          f"T={args.tokens} x Dt={args.text_dim} tokens; store {size_gb:.2f} GB "
          f"{'reused' if reuse else 'written'} in {time.perf_counter() - start:.0f} s; {args.threads} thread(s)")
    print("| model | rows trained | s/epoch measured | s/epoch for all N (x N/rows) | rows/s | peak RSS MB "
          "| of which after imports |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        cmd = [sys.executable, __file__, "scale-worker", "--cache", str(folder), "--models", model,
               "--threads", str(args.threads), "--rows", str(args.rows)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"| {model} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {model} | {r['rows']} | {r['seconds']:.1f} | {r['seconds'] * args.n / r['rows']:.0f} | "
              f"{r['rows'] / r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['imports_rss_mb']:.0f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["fashion", "options", "scale", "scale-worker"])
    p.add_argument("--cache", action="append", default=[], help="cache directory (repeatable)")
    p.add_argument("--models", default="single,dual,cross,vlad,mlp")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=NeuralOptions().epochs)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/neural_bench", help="where run directories go")
    p.add_argument("--n", type=int, default=100_000, help="scale: generated videos")
    p.add_argument("--rows", type=int, default=0, help="scale: train on ROWS random rows only (0: all)")
    p.add_argument("--aggregates", action="store_true", help="scale: run the aggregates stage (mlp, vlad)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--frame-dim", type=int, default=1280)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--dir", default=None, help="scale: keep the generated store here (reused when complete)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"fashion": bench_fashion, "options": bench_options, "scale": bench_scale,
     "scale-worker": scale_worker}[args.what](args)


if __name__ == "__main__":
    main()
