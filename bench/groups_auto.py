"""ucf14, `train-neural --groups auto` (issue 21): do the near-duplicate groups found in the features match the
actors, and do out-of-fold scores on their folds predict the held-out score on unseen actors?

    python -m bench protocols ucf14 --out bench_cache/heldout_ucf14
    python run.py train-neural --cache bench_cache/heldout_ucf14 --groups auto --out RUN_AUTO --threads 1
    python run.py train-neural --cache bench_cache/heldout_ucf14 --groups none --out RUN_NONE --threads 1
    python run.py stack --model RUN_AUTO --out STACK_AUTO --threads 1    (and RUN_NONE -> STACK_NONE)
    python -m bench groups_auto --cache bench_cache/heldout_ucf14 --run auto=RUN_AUTO,STACK_AUTO \
        --run random=RUN_NONE,STACK_NONE

Tables: (1) agreement of the auto groups (neural/neardup.py on the labelled split) with actor groups built
by hand from ucf14's id order (bench.ucf14.actor_groups: 5 runs per class, the groups file of the grouped
runs, and 25 runs per class, about UCF101's 25 actor groups): adjusted Rand index, pair precision (share
of the pairs put together that the hand groups also join) and pair recall; (2) LR(mean frame, raw, C=0.01)
out of fold on random, auto and hand-built folds, against the same LR fitted on all labelled videos and
scored on the held-out actors; (3) per --run: each base model's and the submission's OOF (the stack's
table) against held-out, with 90% paired bootstrap bands (1,000 resamples of the test videos).
"""
import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score

from core import schema
from bench.common import Table, write_record
from bench.protocols import data_dir_of, read_answers
from bench.ucf14 import TEST, actor_groups, mean_frames
from features.store import StoreReader
from neural.folds import make_folds, make_group_folds
from neural.metrics import PairedBootstrap, band, challenge_metric
from neural.neardup import NearDupRule, store_groups
from stacking.rundir import load_run, split_predictions
from stacking.submission import read_predictions

BENCHMARK = {"kind": "quality", "summary": "ucf14: --groups auto against hand-built actor groups (ARI) and the OOF vs held-out gap of random and auto folds"}
C = 0.01


def pair_scores(truth, found):
    """(precision, recall) of the pairs `found` joins against the pairs `truth` joins."""
    def pairs(g):
        _, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
        return inv, counts
    t_inv, t_counts = pairs(truth)
    f_inv, f_counts = pairs(found)
    both = np.unique(np.c_[t_inv, f_inv], axis=0, return_counts=True)[1]
    joint = float((both * (both - 1) / 2).sum())
    return joint / max(float((f_counts * (f_counts - 1) / 2).sum()), 1), joint / float((t_counts * (t_counts - 1) / 2).sum())


def lr_oof(x, y, fold):
    """(N,) out-of-fold predictions of LR(raw, C) over `fold`."""
    out = np.zeros(len(y), np.int64)
    for k in np.unique(fold):
        held = fold == k
        out[held] = LogisticRegression(C=C, max_iter=3000).fit(x[~held], y[~held]).predict(x[held])
    return out


def test_truth(cache, run):
    test_ids, probas = split_predictions(run, TEST)
    answers = read_answers(data_dir_of(cache) / "answers" / f"{TEST}.csv")
    index = {c: i for i, c in enumerate(run.fine_classes)}
    return test_ids, probas, np.array([index[answers[v]] for v in test_ids]), index


def run_rows(name, run_dir, stack_dir, cache, table, resamples, submissions):
    """Table (3)'s rows for one run and its stack: OOF (the stack's table) vs held-out, with bands; the
    submission's bootstrap samples go into `submissions` {name: (B,)} (with the raw LR's as "LR")."""
    run = load_run(run_dir)
    test_ids, probas, true, index = test_truth(cache, run)
    metrics = json.loads((Path(stack_dir) / "metrics.json").read_text())
    oof = {row: m["mean"] for row, m in metrics["table"].items()}
    preds = {f"base:{m}": probas[m].argmax(1) for m in run.models}
    preds["average"] = np.mean(list(probas.values()), 0).argmax(1)
    submitted = read_predictions(Path(stack_dir) / "submission.csv")
    preds["submission"] = np.array([index[submitted[v]] for v in test_ids])
    oof["submission"] = oof[f"{metrics['stacker']}+reweight"]
    boot = PairedBootstrap(true, run.fine_to_coarse, resamples)
    submissions[name] = boot.means(preds["submission"])
    if "LR" not in submissions:
        x, y, _ = mean_frames(cache, schema.LABELLED_SPLIT)
        x_test, _, _ = mean_frames(cache, TEST, test_ids)
        submissions["LR"] = boot.means(LogisticRegression(C=C, max_iter=3000).fit(x, y).predict(x_test))
    for row, pred in preds.items():
        score = challenge_metric(true, pred, run.fine_to_coarse)["mean"]
        lo, hi = band(boot.means(pred))
        table.add(name, row, oof.get(row, float("nan")), score, f"{lo:.3f}..{hi:.3f}", oof.get(row, np.nan) - score)
    written = metrics["predictions"].get(TEST, {})
    shift = written.get("label_shift", {})
    return {"run": name, "models": run.models, "stacker": metrics["stacker"], "label_shift_applied": shift.get("applied"), "tv": shift.get("tv_from_training_priors"),
            "noise_bar": shift.get("noise_bar"), "decoding_changed": written.get("decoding_changed"),
            "decode_oof_per_fold": metrics.get("decode_oof_per_fold")}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench groups_auto", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="bench.protocols ucf14's cache (labeled.h5, test.h5)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR,STACK_DIR")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args(argv)

    x, y, ids = mean_frames(args.cache, schema.LABELLED_SPLIT)
    with StoreReader(schema.store_path(args.cache, schema.LABELLED_SPLIT)) as reader:
        auto, record = store_groups(reader, np.arange(len(reader)), NearDupRule())
    hand = {n: actor_groups(ids, y, x, n, window=4 if n == 5 else 2) for n in (5, 25)}
    agree = Table("auto groups (neural/neardup.py) against actor groups built by hand", [
        "hand-built groups", "hand groups", "auto groups (>1 item)", "items grouped", "ARI", "pair precision",
        "pair recall"])
    sizes = np.bincount(auto)
    for n, g in hand.items():
        precision, recall = pair_scores(g, auto)
        agree.add(f"{n} runs per class", len(np.unique(g)), int((sizes > 1).sum()), record["n_grouped"],
                  adjusted_rand_score(g, auto), precision, recall)

    folds = {"random (stratified)": make_folds(y, 5, 0),
             "auto groups": make_group_folds(y, auto.astype(str), 5, 0),
             "hand groups, 5 runs per class": make_group_folds(y, hand[5], 5, 0)}
    x_test, _, _ = mean_frames(args.cache, TEST, None)
    with StoreReader(schema.store_path(args.cache, TEST)) as reader:
        test_ids = reader.ids
    answers = read_answers(data_dir_of(args.cache) / "answers" / f"{TEST}.csv")
    with StoreReader(schema.store_path(args.cache, schema.LABELLED_SPLIT)) as reader:
        classes, f2c = reader.fine_classes, reader.fine_to_coarse
    true = np.array([classes.index(answers[v]) for v in test_ids])
    held = challenge_metric(true, LogisticRegression(C=C, max_iter=3000).fit(x, y).predict(x_test), f2c)["mean"]
    lr = Table(f"LR(mean frame, raw, C={C}): out of fold on each fold kind vs held-out actors ({held:.4f})",
               ["folds", "OOF mean-F1", "held-out mean-F1", "OOF - held-out"])
    for name, fold in folds.items():
        oof = challenge_metric(y, lr_oof(x, y, fold), f2c)["mean"]
        lr.add(name, oof, held, oof - held)

    tables, runs = [agree, lr], []
    if args.run:
        gap = Table("OOF (the stack's table) vs held-out actors, 90% paired bootstrap bands",
                    ["run", "method", "OOF mean-F1", "held-out mean-F1", "90% band", "OOF - held-out"])
        submissions = {}
        for pair in args.run:
            name, _, dirs = pair.partition("=")
            run_dir, stack_dir = dirs.split(",")
            runs.append(run_rows(name, run_dir, stack_dir, args.cache, gap, args.resamples, submissions))
        diffs = Table("submissions' held-out differences, paired (the same resamples)", ["difference", "mean", "90% band"])
        names = [n for n in submissions if n != "LR"]
        for a, b in [(n, "LR") for n in names] + list(zip(names[:1] * (len(names) - 1), names[1:])):
            d = submissions[a] - submissions[b]
            diffs.add(f"{a} - {b}", float(d.mean()), "{:+.4f}..{:+.4f}".format(*band(d)))
        tables += [gap, diffs]
        print(json.dumps(runs, indent=1))
    write_record("groups_auto", argv, tables, notes=[record["rule"], record["reason"],
                 f"intrinsic dimension {record['intrinsic_dim']}, f {record['f']}",
                 *[f"run {r['run']}: models {', '.join(r['models'])}; stack {r['stacker']}, label shift applied "
                   f"{r['label_shift_applied']}, labels changed by decoding {r['decoding_changed']}" for r in runs],
                 "differences: bootstrap means of paired resamples"], extra={"auto_groups": record,
                 "decisions": runs})


if __name__ == "__main__":
    main()
