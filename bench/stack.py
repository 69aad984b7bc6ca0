"""Stacking benchmark: the cost of a plain multiclass LightGBM stacker at scale, and the comparison table.

    python -m bench stack synthetic [--n 100000 --models 5 --classes 200 --threads 1]
    python -m bench stack runs RUN_DIR [RUN_DIR ...] --out DIR [--models a,b] [--threads 1]

`synthetic`: out-of-fold-like probabilities of M models for N videos over C long-tailed classes.
Times the multiclass LightGBM stacker (dataset construction, then boosting rounds: it grows C trees
per round, so a few rounds are timed and the per-round cost is extrapolated, printed as such), and the
top-k rerank stacker fit in full; scores both (and the average, best single model) on a 20% hold-out.
Wall and process-CPU seconds are both printed; on the shared machine the wall clock swings with other
agents' load (a per-round wall difference can even come out near zero), so extrapolate from CPU.
`runs`: `stack` on each run directory (all stackers side by side on the run's folds) and the time of
each stage, then how much the stack with reweighting beats the best base model and the average.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.common import Table, measured, write_record
from neural.metrics import metric_from_proba
from stacking.pipeline import StackOptions, stack
from stacking.stackers import LGBMStacker, RerankStacker, StackInput

BENCHMARK = {"kind": "speed", "summary": "the stackers' cost at scale (synthetic) and their table side by side on trained runs (runs)"}
METRICS = ("mean", "l2_micro", "l2_macro", "l1_micro", "l1_macro")


def synthetic_input(n, n_models, n_classes, seed=0, chunk=20000):
    """StackInput with long-tailed labels; model m is sharp on its own slice of the classes."""
    rng = np.random.default_rng(seed)
    prior = 1.0 / np.arange(1, n_classes + 1) ** 0.9
    label = rng.choice(n_classes, size=n, p=prior / prior.sum())
    probas = np.empty((n_models, n, n_classes), np.float32)             # (M, N, C)
    sharp = np.array_split(rng.permutation(n_classes), n_models)
    for m in range(n_models):
        for s in range(0, n, chunk):
            y = label[s:s + chunk]
            logits = rng.normal(scale=1.0, size=(len(y), n_classes)).astype(np.float32)
            logits[np.arange(len(y)), y] += np.where(np.isin(y, sharp[m]), 3.5, 1.5)
            logits += np.log(prior)[None, :] * 0.5                      # head classes favoured
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probas[m, s:s + chunk] = e / e.sum(axis=1, keepdims=True)
    signals = np.stack([probas.max(axis=2).T[:, m] for m in range(n_models)], axis=1)   # (N, M)
    return StackInput(probas, signals.astype(np.float32)), label


def f2c_for(n_classes):
    return np.arange(n_classes) // 10                                   # ten fine classes per coarse


def bench_synthetic(args, argv):
    t0 = time.perf_counter()
    X, y = synthetic_input(args.n, args.models, args.classes)
    print(f"synthetic input {args.n} x {args.models} models x {args.classes} classes: "
          f"{time.perf_counter() - t0:.1f} s to generate")
    rng = np.random.default_rng(1)
    held = rng.random(args.n) < 0.2
    train_X, test_X, f2c = X.take(~held), X.take(held), f2c_for(args.classes)
    rows = {"best single model": max((metric_from_proba(y[held], p, f2c)["mean"] for p in test_X.probas)),
            "average": metric_from_proba(y[held], test_X.probas.mean(axis=0), f2c)["mean"]}
    times = {}                                          # name -> (wall s, cpu s)

    # plain multiclass LightGBM: time a few rounds, extrapolate to its default round count
    for rounds in (args.lgbm_rounds, 2 * args.lgbm_rounds):
        with measured() as c:
            lgbm = LGBMStacker(n_rounds=rounds, threads=args.threads).fit(train_X, y[~held])
        times[f"lgbm multiclass fit, {rounds} rounds"] = (c.wall_s, c.cpu_s)
    (w1, c1), (w2, c2) = times[f"lgbm multiclass fit, {args.lgbm_rounds} rounds"], \
        times[f"lgbm multiclass fit, {2 * args.lgbm_rounds} rounds"]
    per_round = ((w2 - w1) / args.lgbm_rounds, (c2 - c1) / args.lgbm_rounds)
    default_rounds = LGBMStacker().params.n_rounds
    extra = default_rounds - args.lgbm_rounds
    times["lgbm multiclass: per round (measured difference)"] = per_round
    lgbm_full = f"lgbm multiclass: {default_rounds} rounds (EXTRAPOLATED)"
    times[lgbm_full] = (w1 + per_round[0] * extra, c1 + per_round[1] * extra)
    rows[f"lgbm multiclass ({2 * args.lgbm_rounds} rounds only)"] = metric_from_proba(
        y[held], lgbm.predict_proba(test_X), f2c)["mean"]
    del lgbm

    with measured() as c:
        rerank = RerankStacker(top_k=args.top_k, threads=args.threads, fine_to_coarse=f2c).fit(train_X, y[~held])
    rerank_fit = f"rerank fit (top-{args.top_k}, {rerank.params.n_rounds} rounds, in full)"
    times[rerank_fit] = (c.wall_s, c.cpu_s)
    with measured() as c:
        proba = rerank.predict_proba(test_X)
    times[f"rerank predict {int(held.sum())} videos"] = (c.wall_s, c.cpu_s)
    rows[f"rerank top-{args.top_k}"] = metric_from_proba(y[held], proba, f2c)["mean"]
    print(f"rerank candidate recall@{args.top_k} on train: {rerank.train_recall_:.4f}")

    cost = Table(f"Cost, {args.n:,} videos x {args.models} models x {args.classes} classes, {args.threads} thread(s)",
                 ["step", "wall s", "process CPU s"])
    for k, (wall, cpu) in times.items():
        cost.add(k, f"{wall:.1f}", f"{cpu:.1f}")
    quality = Table("Hold-out challenge metric (mean of four F1s), 20% of the videos", ["method", "mean-F1"])
    for k, v in rows.items():
        quality.add(k, v)
    ratios = {"lgbm multiclass (extrapolated) / rerank fit, wall": times[lgbm_full][0] / times[rerank_fit][0],
              "lgbm multiclass (extrapolated) / rerank fit, CPU": times[lgbm_full][1] / times[rerank_fit][1]}
    write_record("stack", argv, [cost, quality], ratios, variant="synthetic")


def bench_runs(args, argv):
    tables, ratios, notes = [], {}, []
    for run_dir in args.run_dirs:
        out = Path(args.out) / Path(run_dir).name
        options = StackOptions(threads=args.threads, split=args.split, compare=tuple(args.compare),
                               models=tuple(m for m in args.models.split(",") if m))
        start = time.perf_counter()
        metrics = stack(run_dir, out, options)
        total = time.perf_counter() - start
        table = metrics["table"]
        t = Table(f"{Path(run_dir).name}: {metrics['n_videos']:,} videos, {metrics['n_classes']} classes, "
                  f"{metrics['n_folds']} folds, out of fold", ["method", *METRICS])
        for name, m in table.items():
            t.add(name, *(m[k] for k in METRICS))
        tables.append(t)
        final = table[f"{options.stacker}+reweight"]["mean"]
        best_name, best = max(((k, v["mean"]) for k, v in table.items() if k.startswith("base:")), key=lambda t: t[1])
        lq = metrics["low_quartile"]
        ratios[f"{Path(run_dir).name}: stack+reweight - best base model ({best_name})"] = final - best
        ratios[f"{Path(run_dir).name}: stack+reweight - average"] = final - table["average"]["mean"]
        notes += [f"{Path(run_dir).name}: lowest-frequency quartile ({lq['n_classes']} classes, <= {lq['max_count']} "
                  f"videos): macro-F1 {lq['macro_f1_before']:.4f} -> {lq['macro_f1_after']:.4f}",
                  f"{Path(run_dir).name}: stage times (s) {json.dumps(metrics['times_s'])}; total {total:.1f}"]
        print("\n".join(notes[-2:]))
    write_record("stack", argv, tables, ratios, notes, variant="runs")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    syn = sub.add_parser("synthetic")
    syn.add_argument("--n", type=int, default=100_000)
    syn.add_argument("--models", type=int, default=5)
    syn.add_argument("--classes", type=int, default=200)
    syn.add_argument("--top-k", type=int, default=10)
    syn.add_argument("--lgbm-rounds", type=int, default=2, help="rounds timed (then twice as many)")
    syn.add_argument("--threads", type=int, default=1)
    runs = sub.add_parser("runs")
    runs.add_argument("run_dirs", nargs="+")
    runs.add_argument("--out", required=True)
    runs.add_argument("--split", default="")
    runs.add_argument("--models", default="", help="comma-separated base models; default: all of run.json")
    runs.add_argument("--compare", nargs="*", default=["logreg", "lgbm"])
    runs.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    bench_synthetic(args, argv) if args.what == "synthetic" else bench_runs(args, argv)


if __name__ == "__main__":
    main()
