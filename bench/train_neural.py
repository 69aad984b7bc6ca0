"""Benchmarks of train-neural. Every figure printed here is measured in the same run.

    fashion  each model's out-of-fold challenge metric and seconds per epoch on one or more cached
             stores (the fashion full- and masked-title stores), beside a logistic regression on
             [mean-pooled frame, pooled title] embeddings over the same folds.
    options  the regularisers (label smoothing, class-balanced weights, EMA, FGM, R-Drop), each
             switched on alone over an all-off baseline, and all of them together; OOF metric per model.
    scale    seconds per epoch and peak memory (RSS, each model in its own process) on N generated
             videos of a synthetic store (demo.synthetic_store), streaming.

    python -m bench train_neural fashion --cache bench_cache/fashion_masked --cache bench_cache/fashion_full
    python -m bench train_neural options --cache bench_cache/fashion_masked --models mlp
    python -m bench train_neural scale --n 100000
(the fashion stores: `python -m bench make_fashion_stores`.)
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from core import schema
from bench.common import REPO, Table, cache_dir, peak_rss_mib, write_record
from features.store import StoreReader
from demo.synthetic_store import write_synthetic_store
from neural.folds import load_folds
from neural.metrics import metric_from_proba
from neural.options import NeuralOptions
from neural.pipeline import labelled_rows, train_neural

COLUMNS = ("mean", "l2_micro", "l2_macro", "l1_micro", "l1_macro")
BENCHMARK = {"kind": "quality", "summary": "train-neural: OOF metric and s/epoch beside a logistic regression (fashion), the regularisers (options), s/epoch and RSS at scale (scale)"}


def metric_table(title, first):
    return Table(title, [first, *COLUMNS, "s/epoch"])


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


def bench_fashion(args, argv):
    opts = NeuralOptions(n_folds=args.folds, epochs=args.epochs, threads=args.threads)
    tables = []
    for cache in args.cache:
        run_dir = Path(args.out) / Path(cache).name
        results = train_neural(cache, run_dir, args.models.split(","), opts)
        lr_metrics, lr_seconds = logistic_oof(cache, run_dir)
        table = metric_table(f"{Path(cache).name}: out of fold ({args.folds} folds, {args.epochs} epochs, "
                             f"{args.threads} thread(s))", "model")
        table.add("logistic regression, [mean frame, title]", *(lr_metrics[k] for k in COLUMNS),
                  f"{lr_seconds / args.folds:.1f} per fold")
        for name, m in results.items():
            table.add(name, *(m["oof"][k] for k in COLUMNS), f"{np.mean(m['seconds_per_epoch']):.1f}")
        tables.append(table)
    write_record("train_neural", argv, tables, variant="fashion")


# ------------------------------------------------------------------ options


REGULARISERS = {"label_smoothing": dict(label_smoothing=0.1), "class_balanced": dict(class_balanced=True),
                "ema": dict(ema=True), "fgm": dict(fgm=True), "rdrop": dict(rdrop=True)}
ALL_OFF = dict(label_smoothing=0.0, class_balanced=False, ema=False, fgm=False, rdrop=False)


def bench_options(args, argv):
    base = NeuralOptions(n_folds=args.folds, epochs=args.epochs, threads=args.threads, **ALL_OFF)
    variants = {"all off": {}, **{f"+ {k}": v for k, v in REGULARISERS.items()}}
    variants["all on"] = {k: v for d in REGULARISERS.values() for k, v in d.items()}
    variants["defaults"] = {k: getattr(NeuralOptions(), k) for k in ALL_OFF}
    tables = []
    for cache in args.cache:
        table = metric_table(f"{Path(cache).name}: regularisers, out of fold ({args.folds} folds, {args.epochs} epochs)",
                             "model, options")
        for name, change in variants.items():
            out = Path(args.out) / "options" / Path(cache).name / name.replace(" ", "_").replace("+", "plus")
            results = train_neural(cache, out, args.models.split(","), replace(base, **change))
            for model, m in results.items():
                table.add(f"{model}, {name}", *(m["oof"][k] for k in COLUMNS), f"{np.mean(m['seconds_per_epoch']):.1f}")
        tables.append(table)
    write_record("train_neural", argv, tables, variant="options")


# ------------------------------------------------------------------ scale


def scale_worker(args):
    """One model, one epoch on every row of the store (no folds): seconds and peak RSS of this process."""
    from features.codebook import Codebook
    from core.device import resolve_device
    from neural.data import StoreBatches
    from neural.models import FitContext, model_entry, model_inputs
    from neural.spec import spec_from_store
    from neural.train import fit_fold
    torch.set_num_threads(args.threads)
    imports_mb = peak_rss_mib()                     # torch, sklearn, h5py: before any data is read
    reader = StoreReader(schema.store_path(args.cache[0], "labeled"))
    opts = NeuralOptions(epochs=1, threads=args.threads)
    names = model_inputs(args.models, reader)
    rows, _, labels = labelled_rows(reader)
    if args.rows:       # a seeded random subset, so reads stay scattered over the whole file
        rows = np.sort(np.random.default_rng(0).choice(rows, args.rows, replace=False))
    dataset = StoreBatches(reader, names, labels, reader.fine_to_coarse, opts.max_tokens)
    codebook = Codebook.load(Path(args.cache[0]) / "codebook.h5") if model_entry(args.models).needs_codebook else None
    spec = spec_from_store(args.models, reader, opts, names, codebook)
    _, info = fit_fold(spec, FitContext(dataset, rows, opts.batch_size, codebook), opts, 0, resolve_device())
    peak_mb = peak_rss_mib()
    print(json.dumps({"seconds": info["seconds_per_epoch"][0], "rows": len(rows), "peak_rss_mb": peak_mb,
                      "imports_rss_mb": imports_mb}))


def bench_scale(args, argv):
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        run_scale(args, argv, args.dir)
    else:
        cache_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            run_scale(args, argv, tmp)


def run_scale(args, argv, folder):
    """Generate (or reuse, when --dir holds a complete one of the same size) the store, then time."""
    path = Path(folder) / "labeled.h5"
    reuse = path.exists() and StoreReader(path, require_complete=False).attrs.get("complete") \
        and len(StoreReader(path)) == args.n
    if not reuse:
        write_synthetic_store(folder, args.n, args.frames, args.frame_dim, args.tokens, args.text_dim, signal=0.5)
    if args.aggregates and not StoreReader(path).attrs.get("aggregates_complete"):
        from features.aggregates import run_aggregates
        run_aggregates(folder, ["labeled"])
    size_gb = path.stat().st_size / 1e9
    table = Table(f"{args.n:,} synthetic videos, F={args.frames} x D={args.frame_dim} frames, T={args.tokens} x "
                  f"Dt={args.text_dim} tokens; store {size_gb:.2f} GB; {args.threads} thread(s); each model its own process",
                  ["model", "rows trained", "s/epoch measured", "s/epoch for all N (x N/rows)", "rows/s", "peak RSS MB",
                   "of which after imports"])
    for model in args.models.split(","):
        cmd = [sys.executable, "-m", "bench", "train_neural", "scale-worker", "--cache", str(folder), "--models", model,
               "--threads", str(args.threads), "--rows", str(args.rows)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            raise SystemExit(f"train_neural scale: {model} failed: {out.stderr.strip().splitlines()[-1]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        table.add(model, r["rows"], f"{r['seconds']:.1f}", f"{r['seconds'] * args.n / r['rows']:.0f}",
                  f"{r['rows'] / r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['imports_rss_mb']:.0f}")
    write_record("train_neural", argv, [table], variant="scale")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench train_neural", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["fashion", "options", "scale", "scale-worker"])
    p.add_argument("--cache", action="append", default=[], help="cache directory (repeatable)")
    p.add_argument("--models", default="single,dual,cross,vlad,mlp")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=NeuralOptions().epochs)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="where run directories go [default: BENCH_CACHE/train_neural]")
    p.add_argument("--n", type=int, default=100_000, help="scale: generated videos")
    p.add_argument("--rows", type=int, default=0, help="scale: train on ROWS random rows only (0: all)")
    p.add_argument("--aggregates", action="store_true", help="scale: run the aggregates stage (mlp, vlad)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--frame-dim", type=int, default=1280)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--dir", default=None, help="scale: keep the generated store here (reused when complete)")
    args = p.parse_args(argv)
    args.out = args.out or str(cache_dir("train_neural"))
    torch.set_num_threads(args.threads)
    if args.what == "scale-worker":
        scale_worker(args)
    else:
        {"fashion": bench_fashion, "options": bench_options, "scale": bench_scale}[args.what](args, argv)


if __name__ == "__main__":
    main()
