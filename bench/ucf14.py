"""ucf14, unseen actors (issue 13 item 4): a run's base models and stacks on the held-out runs of ids,
against logistic regressions on the mean frame, with paired 90% bootstrap bands.

    python -m bench protocols ucf14 --out bench_cache/heldout_ucf14
    python run.py train-neural --cache bench_cache/heldout_ucf14 --out RUN --threads 1
    python run.py stack --model RUN --out STACK --threads 1
    python -m bench ucf14 --cache bench_cache/heldout_ucf14 --run RUN --stack submission=STACK

Grouped folds (train-neural --groups): the groups file of the labelled split, ~5 runs of consecutive ids
per class cut where the actor changes (bench.protocols.run_boundary, as the held-out runs were cut):

    python -m bench ucf14 groups --cache bench_cache/heldout_ucf14 --out GROUPS.csv
    python run.py train-neural --cache bench_cache/heldout_ucf14 --groups GROUPS.csv --out RUN --threads 1

Baselines, fitted on the whole labelled split (no C chosen on the test): LR(mean frame) at C=0.01 on the
raw features and standardised feature by feature. The second is the usual recipe and collapses on
unseen actors here (the 512 PCA'd dims have a long low-variance tail; scaled to unit variance it is
actor noise), so the raw one is the bar the differences are measured against.
Every score: neural.metrics.challenge_metric; bands: 1,000 resamples of the test videos (seeded), the
same resamples for every method, so a difference's band is paired.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from core import schema
from bench.common import Table, write_record
from bench.protocols import by_class, data_dir_of, read_answers, run_boundary
from features.store import StoreReader, rows_of
from neural.metrics import PairedBootstrap, band, challenge_metric
from stacking.rundir import load_run, split_predictions
from stacking.submission import read_predictions

TEST = "test"
BENCHMARK = {"kind": "quality", "summary": "ucf14, unseen actors: a run's models and stacks on held-out runs of ids against LRs on the mean frame (groups: grouped folds)"}


def mean_frames(cache, split, ids=None):
    """(N, D) masked mean frame of each video of `split` (rows of `ids` when given), and the ids."""
    with StoreReader(schema.store_path(cache, split)) as reader:
        rows = np.arange(len(reader)) if ids is None else rows_of(reader.ids, ids, reader.path)
        frames = reader.read(schema.FRAME_EMB, rows).astype(np.float32)          # (N, F, D)
        mask = reader.read(schema.FRAME_MASK, rows)[..., None]                    # (N, F, 1)
        labels = reader.read(schema.LABEL_FINE, rows).astype(np.int64)
        return (frames * mask).sum(1) / np.maximum(mask.sum(1), 1), labels, reader.ids[rows]


def lr_baselines(cache, test_ids, C=0.01):
    """{name: (N_test,) predictions} of LR(mean frame) on raw and on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x, y, _ = mean_frames(cache, "labeled")
    keep = y >= 0
    x_test, _, _ = mean_frames(cache, TEST, test_ids)
    out = {}
    for name, model in ((f"LR(mean frame), raw, C={C:g}", LogisticRegression(C=C, max_iter=3000)),
                        (f"LR(mean frame), standardised, C={C:g}",
                         make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000)))):
        out[name] = model.fit(x[keep], y[keep]).predict(x_test)
    return out


def actor_groups(ids, labels, mean_frame, n_runs=5, window=4):
    """(N,) str group of each labelled video: per class, its ids sorted by number cut into n_runs runs of
    consecutive ids, each cut moved to the nearby boundary where neighbouring clips are least alike (an
    actor change). Not product code: it knows ucf14's id order (class, actor group, clip)."""
    groups = np.empty(len(ids), dtype=object)
    for c, rows in by_class(labels).items():
        rows = rows[np.argsort([int("".join(ch for ch in ids[r] if ch.isdigit())) for r in rows])]
        emb = mean_frame[rows] / np.linalg.norm(mean_frame[rows], axis=1, keepdims=True)
        sim = (emb[1:] * emb[:-1]).sum(axis=1)                           # (n_c - 1,)
        n = len(rows)
        cuts = sorted({0, n} | {run_boundary(sim, round(n * j / n_runs), window) for j in range(1, n_runs)})
        for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            groups[rows[a:b]] = f"{c}_{j}"
    return groups


def write_groups(argv):
    parser = argparse.ArgumentParser(prog="python -m bench ucf14 groups", description="groups file (id,group) of the labelled split")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", type=int, default=5, help="runs of consecutive ids per class")
    args = parser.parse_args(argv)
    x, y, ids = mean_frames(args.cache, "labeled")
    keep = y >= 0
    groups = actor_groups(ids[keep], y[keep], x[keep], args.runs)
    with open(args.out, "w") as fh:
        fh.write("id,group\n" + "".join(f"{v},{g}\n" for v, g in zip(ids[keep], groups)))
    sizes = np.unique(groups, return_counts=True)[1]
    print(f"{args.out}: {keep.sum()} ids in {len(sizes)} groups (sizes {sizes.min()}..{sizes.max()})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["groups"]:
        return write_groups(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench ucf14", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--run", required=True, help="train-neural RUN_DIR on the cache")
    parser.add_argument("--models", default="", help="base models to score (default: run.json's)")
    parser.add_argument("--stack", action="append", default=[], metavar="NAME=STACK_DIR")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", help="write the entries as JSON here")
    args = parser.parse_args(argv)

    run = load_run(args.run, [m for m in args.models.split(",") if m] or None)
    test_ids, probas = split_predictions(run, TEST)
    answers = read_answers(data_dir_of(args.cache) / "answers" / f"{TEST}.csv")
    index = {c: i for i, c in enumerate(run.fine_classes)}
    true = np.array([index[answers[v]] for v in test_ids])
    preds = {f"base:{m}": probas[m].argmax(1) for m in run.models}
    preds["average of these base models"] = np.mean(list(probas.values()), 0).argmax(1)
    for pair in args.stack:
        name, _, stack_dir = pair.partition("=")
        submitted = read_predictions(Path(stack_dir) / "submission.csv")
        preds[f"stack {name}"] = np.array([index[submitted[v]] for v in test_ids])
    preds.update(lr_baselines(args.cache, test_ids))
    bar = next(n for n in preds if n.startswith("LR(mean frame), raw"))

    boot = PairedBootstrap(true, run.fine_to_coarse, args.resamples)
    samples = {name: boot.means(pred) for name, pred in preds.items()}
    entries = []
    table = Table(f"{len(true)} test videos of unseen actors; differences against {bar}, paired 90% bootstrap bands "
                  f"({args.resamples:,} resamples)", ["method", "held-out mean-F1", "90% band", "vs LR(mean, raw)", "90% band"])
    for name, pred in preds.items():
        score = challenge_metric(true, pred, run.fine_to_coarse)["mean"]
        diff = score - challenge_metric(true, preds[bar], run.fine_to_coarse)["mean"]
        entry = {"name": name, "test": score, "band": band(samples[name]), "diff_vs_lr": diff,
                 "diff_band": band(samples[name] - samples[bar])}
        entries.append(entry)
        table.add(name, f"{score:.4f}", f"{entry['band'][0]:.3f}..{entry['band'][1]:.3f}", f"{diff:+.4f}",
                  f"{entry['diff_band'][0]:+.3f}..{entry['diff_band'][1]:+.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(entries, indent=1))
    write_record("ucf14", argv, [table])


if __name__ == "__main__":
    main()
