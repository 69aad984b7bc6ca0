"""ucf14, unseen actors: where the last errors are, and what linear probes on the mean frame can still do.

    python bench/ucf14_probes.py --cache /work/cache/heldout_ucf14 --groups GROUPS.csv \
        [--run RUN_DIR] [--stack NAME=STACK_DIR ...]

1. Errors: the test videos each method gets wrong (the raw LR on the mean frame, the run's base models,
   each stack's submission.csv), and the videos every one of them gets wrong, with the LR's probability
   of the true class: mistakes shared by every method are the part no choice among them can fix.
2. Probes, each chosen by grouped 5-fold CV on the labelled split (folds from the groups file, as
   `train-neural --groups` draws them) and then scored once on the test split, paired 90% bands against
   the LR: label smoothing over the unlabelled videos' cosine kNN graph (in CV the held-out fold is the
   unlabelled set, as the test split is for the final fit); self-training (the LR refitted with its
   confident predictions on the unlabelled videos, twice); the LR with the temporal power spectrum of
   the centred, unit-norm frame trajectory appended (12 bins: how periodic the motion is).
Scratch measurement, not product code: the findings are in bench/README.md.
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_ucf14 import TEST, mean_frames  # noqa: E402
from bench.protocols import data_dir_of, read_answers  # noqa: E402
from features import schema  # noqa: E402
from features.categories import load_category_map  # noqa: E402
from features.store import StoreReader  # noqa: E402
from neural.folds import make_group_folds  # noqa: E402
from neural.metrics import PairedBootstrap, band, challenge_metric  # noqa: E402
from stacking.rundir import load_run, split_predictions  # noqa: E402
from stacking.submission import read_predictions  # noqa: E402

C = 0.05                          # the LR bar's C (BENCHMARKS / bench_ucf14: 0.01 and 0.05 score alike)


def lr_proba(x_train, y_train, x_eval):
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(C=C, max_iter=3000).fit(x_train, y_train).predict_proba(x_eval)


def smooth(proba, x, k, alpha, steps=10):
    """Label spreading over the cosine kNN graph of x (N, D): p <- (1 - alpha) p0 + alpha W p."""
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = z @ z.T                                                          # (N, N)
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, 1)[:, :k]                                        # (N, k)
    weight = np.exp((np.take_along_axis(sim, nn, 1) - 1) / 0.05)
    weight /= weight.sum(1, keepdims=True)
    p = proba.copy()
    for _ in range(steps):
        p = (1 - alpha) * proba + alpha * (weight[..., None] * p[nn]).sum(1)
    return p


def self_train(x_train, y_train, x_eval, threshold=0.5, rounds=2):
    p = lr_proba(x_train, y_train, x_eval)
    for _ in range(rounds):
        keep = p.max(1) >= threshold
        p = lr_proba(np.vstack([x_train, x_eval[keep]]), np.concatenate([y_train, p[keep].argmax(1)]), x_eval)
    return p


def spectrum(cache, split):
    """(N, 12) normalised temporal power spectrum (frequencies 1..12) of each video's centred, unit-norm
    frames; every ucf14 video has 25 frames."""
    with StoreReader(schema.store_path(cache, split)) as reader:
        frames = reader.read(schema.FRAME_EMB, np.arange(len(reader))).astype(np.float32)   # (N, F, D)
        n = reader.read(schema.FRAME_MASK, np.arange(len(reader))).sum(1)
    if len(np.unique(n)) != 1:
        raise SystemExit(f"{split}: videos have {sorted(set(n.tolist()))} frames; the spectrum wants one length")
    z = frames[:, :n[0]] - frames[:, :n[0]].mean(1, keepdims=True)
    z /= np.linalg.norm(z, axis=2, keepdims=True) + 1e-6
    power = (np.abs(np.fft.rfft(z, axis=1)) ** 2).sum(2)[:, 1:]
    return power / power.sum(1, keepdims=True)


def probes(x, y, x_test, spec, spec_test):
    """{name: fn(train rows, eval rows or None for the test split) -> (n, C) probabilities}."""
    def on(fn, features=None, features_test=None):
        def run(train, held):
            a = x if features is None else features
            b = x_test if features is None else features_test
            return fn(a[train], y[train], a[held] if held is not None else b)
        return run
    out = {"LR (mean frame, raw)": on(lr_proba)}
    for k in (5, 10, 20):
        for alpha in (0.5, 0.8, 0.95):
            out[f"LR + kNN-graph smoothing k={k} alpha={alpha}"] = on(
                lambda a, ya, b, k=k, alpha=alpha: smooth(lr_proba(a, ya, b), b, k, alpha))
    out["LR self-trained on the unlabelled videos"] = on(self_train)
    for scale in (3, 10, 30):
        out[f"LR [mean, {scale} x spectrum]"] = on(lr_proba, np.hstack([x, scale * spec]),
                                                   np.hstack([x_test, scale * spec_test]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--groups", required=True, help="id,group file of the labelled split")
    parser.add_argument("--run", help="a train-neural run on the cache: its base models' errors too")
    parser.add_argument("--stack", action="append", default=[], metavar="NAME=STACK_DIR")
    args = parser.parse_args(argv)

    x, y, ids = mean_frames(args.cache, "labeled")
    x_test, _, test_ids = mean_frames(args.cache, TEST)
    with open(args.groups, newline="") as fh:
        group_of = {row["id"]: row["group"] for row in csv.DictReader(fh)}
    fold = make_group_folds(y, np.array([group_of[v] for v in ids]), 5, 0)
    categories = load_category_map(data_dir_of(args.cache) / "category_map.csv")   # the store's class order
    classes, fine_to_coarse = categories.fine_ids, categories.fine_to_coarse
    answers = read_answers(data_dir_of(args.cache) / "answers" / f"{TEST}.csv")
    true = np.array([classes.index(answers[v]) for v in test_ids])
    score = lambda t, p: challenge_metric(t, p, fine_to_coarse)["mean"]  # noqa: E731

    lr_test = lr_proba(x, y, x_test)                                       # (N_test, C)
    preds = {"LR (mean frame, raw)": lr_test.argmax(1)}                    # name -> (N_test,) class index
    if args.run:
        run = load_run(args.run)
        run_ids, probas = split_predictions(run, TEST)
        order = [{v: i for i, v in enumerate(run_ids)}[v] for v in test_ids]
        preds.update({f"base:{m}": p[order].argmax(1) for m, p in probas.items() if m != "names"})
    for pair in args.stack:
        name, _, stack_dir = pair.partition("=")
        sub = read_predictions(Path(stack_dir) / "submission.csv")
        preds[f"stack {name}"] = np.array([classes.index(sub[v]) for v in test_ids])
    print(f"## Errors on {len(true)} test videos\n\n| method | errors | mean-F1 |\n|---|---|---|")
    for name, pred in preds.items():
        print(f"| {name} | {(pred != true).sum()} | {score(true, pred):.4f} |")
    shared = np.flatnonzero(np.all([pred != true for pred in preds.values()], axis=0))
    print(f"\nWrong in every method above: {len(shared)} videos")
    for i in shared:
        rank = int((lr_test[i] > lr_test[i, true[i]]).sum()) + 1
        print(f"  {test_ids[i]} true {classes[true[i]]}, LR says {classes[lr_test[i].argmax()]} "
              f"(p_true {lr_test[i, true[i]]:.3f}, rank {rank})")

    spec, spec_test = spectrum(args.cache, "labeled"), spectrum(args.cache, TEST)
    boot = PairedBootstrap(true, fine_to_coarse, 1000)
    bar = boot.means(lr_test.argmax(1))
    print("\n## Probes: grouped CV, then the test split once\n")
    print("| probe | grouped CV | held-out | vs LR (90% band) | of the shared errors, right |\n|---|---|---|---|---|")
    for name, fn in probes(x, y, x_test, spec, spec_test).items():
        oof = np.zeros(len(y), np.int64)
        for k in range(5):
            oof[fold == k] = fn(np.flatnonzero(fold != k), np.flatnonzero(fold == k)).argmax(1)
        pred = fn(np.arange(len(y)), None).argmax(1)
        lo, hi = band(boot.means(pred) - bar)
        print(f"| {name} | {score(y, oof):.4f} | {score(true, pred):.4f} | "
              f"{score(true, pred) - score(true, lr_test.argmax(1)):+.4f} ({lo:+.3f}..{hi:+.3f}) | "
              f"{int((pred[shared] == true[shared]).sum())} of {len(shared)} |", flush=True)


if __name__ == "__main__":
    main()
