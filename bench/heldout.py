"""Held-out protocol (issue 13): run the real commands on the labelled part of a protocol cache, score
everything on its hidden test split beside its out-of-fold (CV) figure, with bootstrap bands.

    python -m bench protocols fashion --protocol heldout --titles masked --out bench_cache/heldout_masked
    python -m bench heldout --cache bench_cache/heldout_masked [--work bench_cache/heldout/heldout_masked]

Steps (each skipped when its output is already there, so a rerun only scores):
1. `python run.py train-neural --cache CACHE --out WORK/run --threads 1` (default models; resumable).
2. `python run.py stack --model WORK/run --out WORK/stack_<name> --threads 1 ...` once per stack
   variant: the default command (the submission: rerank + nested reweighting), one per other stacker
   (`--stacker logreg|lgbm|average`) and `--stacker auto`; `--variant NAME=ARGS` adds candidates
   (e.g. `--variant five='--models single,dual,cross,vlad,mlp'`).
3. A logistic regression on the same embeddings ([mean frame, pooled title], standardised, C chosen
   on the run's own folds from --lr-c), refit on all labelled items.
4. Score on the test split (labels from CACHE_data/answers/test.csv): every base model (the run's
   fold-averaged test probabilities), their average, each stacker before and after its reweighting,
   the LR. Metric: neural.metrics.challenge_metric (mean of l2/l1 micro/macro F1). 90% bootstrap bands
   over the test items (1,000 seeded resamples) for each score and, paired (the same resample), for
   each difference against the LR and against the submission.
Prints the table, writes WORK/heldout.json (every figure, the commands, the load) and the record
bench/results/heldout.<cache name>.json.
"""
import argparse
import json
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from core import schema
from core.records import read_json, write_json
from bench.common import REPO, Table, cache_dir, write_record
from bench.protocols import data_dir_of, read_answers
from bench.train_neural import mean_frame_and_title
from features.store import StoreReader, rows_of
from neural.metrics import METRIC_KEYS, PairedBootstrap, band, challenge_metric, metric_from_proba
from stacking.reweight import PriorReweighter
from stacking.rundir import load_run, split_predictions
from stacking.signals import build_input
from stacking.stackers import load_stacker
from stacking.submission import read_predictions

BENCHMARK = {"kind": "quality", "summary": "the held-out protocol: the real commands on a labelled part, every model and stacker scored on a hidden test split with 90% bands"}

TEST = "test"
SUBMISSION = "submission"          # the stack variant made by the default `stack` command
DEFAULT_VARIANTS = {SUBMISSION: "", "logreg": "--stacker logreg", "average": "--stacker average",
                    "auto": "--stacker auto", "lgbm": "--stacker lgbm"}      # run in this order: cheap first


def load():
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


CODE = REPO                        # the copy of the repository whose run.py runs the commands (--code)


def run_cli(args, log):
    """One `python run.py ...` command, its seconds and the load before and after, appended to log."""
    cmd = [sys.executable, str(CODE / "run.py"), *args]
    entry = {"command": "python run.py " + shlex.join(args), "code": str(CODE), "load_before": load(),
             "started": time.strftime("%H:%M:%S", time.gmtime())}
    print("+", entry["command"], flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    entry.update(seconds=round(time.perf_counter() - start, 1), load_after=load())
    log.append(entry)


# ------------------------------------------------------------------ the real commands


def train(cache, run_dir, train_args, log, groups=()):
    """train-neural is resumable per model and fold: a finished run returns at once.

    groups: model lists trained by concurrent processes into the same run (the first draws folds.h5,
    the others start once it and run.json exist); then one plain call with the default models, which
    finds them done and leaves run.json listing every model."""
    base = ["train-neural", "--cache", str(cache), "--out", str(run_dir), "--threads", "1", *shlex.split(train_args)]
    if groups:
        procs = []
        for i, models in enumerate(groups):
            if i:
                while not ((Path(run_dir) / "folds.h5").exists() and (Path(run_dir) / "run.json").exists()):
                    time.sleep(5)
                time.sleep(10)
            procs.append(threading.Thread(target=run_cli, args=(base + ["--models", models], log)))
            procs[-1].start()
        for proc in procs:
            proc.join()
    run_cli(base, log)


def stack_variant(run_dir, stack_dir, args, log):
    if (Path(stack_dir) / "metrics.json").exists() and (Path(stack_dir) / "model" / "manifest.json").exists():
        return
    extra = shlex.split(args)
    if "--compare" not in extra:
        extra += ["--compare", ""]          # each stacker gets its own run; nothing to score beside it
    run_cli(["stack", "--model", str(run_dir), "--out", str(stack_dir), "--threads", "1", *extra], log)


# ------------------------------------------------------------------ predictions on the test split


def stack_test_proba(stack_dir, cache, ids, probas):
    """(before, after reweighting) (N, C) of the fitted stack on the test split's rows `ids`."""
    meta = read_json(Path(stack_dir) / "stack.json")
    with StoreReader(schema.store_path(cache, TEST)) as reader:
        X = build_input(meta["models"], {m: probas[m] for m in meta["models"]}, reader,
                        rows_of(reader.ids, ids, reader.path), meta["signals"])
    before = load_stacker(Path(stack_dir) / "stacker").predict_proba(X)
    return before, PriorReweighter.load(Path(stack_dir) / "reweight.json").transform(before)


def submitted(stack_dir, ids, fine_classes):
    """(N,) fine class index of each id in STACK/submission.csv."""
    index = {c: i for i, c in enumerate(fine_classes)}
    pred = read_predictions(Path(stack_dir) / "submission.csv")
    return np.array([index[pred[v]] for v in ids])


def stack_cv(metrics):
    """(CV before reweighting, CV after) of a stack's metrics.json table, the honest figures for auto."""
    table, kind = metrics["table"], metrics["stacker"]
    if metrics["options"]["stacker"] == "auto" and "auto (chosen inside each outer fold; honest)" in table:
        return (table["auto (chosen inside each outer fold; honest)"],
                table["auto+reweight (both inside each outer fold; honest)"])
    return table[kind], table[f"{kind}+reweight"]


def linear_probe(x, y, x_test, fold, n_classes, fine_to_coarse, grid, scale="standard", label=None):
    """A logistic regression on x (N, D) -> y (N,) with C chosen from `grid` by OOF mean-F1 on `fold` (N,),
    refit on every row at that C. Returns (OOF proba (N, C) at the chosen C, test proba (N_test, C) of the
    refit on x_test, the chosen C, {str(C): OOF mean-F1} in grid order). scale: 'standard' (each feature to
    unit variance) or 'raw' (the features as given). With `label`, each C's score is printed as it comes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def fit_proba(train, x_out, C):
        steps = [StandardScaler()] if scale == "standard" else []
        lr = make_pipeline(*steps, LogisticRegression(C=C, max_iter=500)).fit(x[train], y[train])
        out = np.zeros((len(x_out), n_classes), np.float32)
        out[:, lr[-1].classes_] = lr.predict_proba(x_out)
        return out

    oofs, scores = {}, {}
    with threadpool_limits(1):
        for C in grid:
            oofs[C] = np.zeros((len(y), n_classes), np.float32)
            for k in np.unique(fold):
                oofs[C][fold == k] = fit_proba(fold != k, x[fold == k], C)
            scores[str(C)] = metric_from_proba(y, oofs[C], fine_to_coarse)["mean"]
            if label:
                print(f"{label} C={C}: OOF mean-F1 {scores[str(C)]:.4f}", flush=True)
        best = max(grid, key=lambda C: scores[str(C)])
        test = fit_proba(np.ones(len(y), bool), x_test, best)
    return oofs[best], test, best, scores


def logistic_baseline(run, cache, test_ids, grid, work, scale="standard"):
    """linear_probe on [mean frame, pooled title] of the run's labelled items and folds, scored on the test
    split's `test_ids`: (OOF proba (N_lab, C), test proba (N_test, C), C, every C's OOF mean-F1).
    scale: 'standard' (../shared/BENCHMARKS.md's probe) or 'raw'. Cached in WORK/lr_<scale>.npz."""
    cache_file = Path(work) / f"lr_{scale}.npz"
    if cache_file.exists():
        saved = np.load(cache_file)
        if "ids" in saved.files and list(saved["grid"]) == list(grid) and list(saved["ids"]) == list(run.ids):
            test_rows = rows_of(saved["test_ids"], test_ids, cache_file)
            return saved["oof"], saved["test"][test_rows], float(saved["C"]), json.loads(str(saved["scores"]))
    with StoreReader(run.store_path) as reader:
        x = mean_frame_and_title(reader, rows_of(reader.ids, run.ids, reader.path))
    with StoreReader(schema.store_path(cache, TEST)) as reader:
        x_test = mean_frame_and_title(reader, rows_of(reader.ids, test_ids, reader.path))
    oof, test, best, scores = linear_probe(x, run.label, x_test, run.fold, run.n_classes, run.fine_to_coarse,
                                           grid, scale, label=f"LR ({scale})")
    np.savez(cache_file, oof=oof, test=test, C=best, grid=np.asarray(grid), scores=json.dumps(scores),
             ids=np.asarray(run.ids, str), test_ids=np.asarray(test_ids, str))
    return oof, test, best, scores


def labelled_from_folds(run_dir):
    """What logistic_baseline needs of a run, from folds.h5 and the labelled store alone: the LR can be
    fitted while the base models still train."""
    from types import SimpleNamespace
    from neural.folds import load_folds
    from neural.outputs import labelled_store_path, read_run
    ids, fold, n_folds, _ = load_folds(Path(run_dir) / "folds.h5")
    path = labelled_store_path(read_run(run_dir))
    with StoreReader(path) as reader:
        label = reader.read(schema.LABEL_FINE, slice(None)).astype(np.int64)[rows_of(reader.ids, ids, path)]
        f2c, n_classes = np.asarray(reader.fine_to_coarse), len(reader.fine_classes)
    return SimpleNamespace(store_path=path, ids=ids, label=label, fold=fold.astype(np.int64), n_folds=n_folds,
                           n_classes=n_classes, fine_to_coarse=f2c)


# ------------------------------------------------------------------ the table


def collect(run, cache, work, variants, true, lr, test_ids, probas):
    """[(name, CV metric dict or None, test pred (N,), note)] in table order."""
    rows = []
    for m in run.models:
        rows.append((f"base:{m}", metric_from_proba(run.label, run.oof[m], run.fine_to_coarse),
                     probas[m].argmax(1), ""))
    rows.append(("average of the base models", metric_from_proba(run.label, np.mean(list(run.oof.values()), 0),
                                                                 run.fine_to_coarse),
                 np.mean([probas[m] for m in run.models], 0).argmax(1), ""))
    for name in variants:
        stack_dir = Path(work) / f"stack_{name}"
        metrics = read_json(stack_dir / "metrics.json")
        before, after = stack_test_proba(stack_dir, cache, test_ids, probas)
        sub = submitted(stack_dir, test_ids, run.fine_classes)
        decided, recorded = decisions(stack_dir, before, run.fine_to_coarse)
        check_submitted(stack_dir, sub, decided[recorded][0], "submission.csv")
        cv_before, cv_after = stack_cv(metrics)
        label = f"stack {name}" if name != SUBMISSION else "stack: default command (the submission)"
        kind = metrics["stacker"]
        note = f"{kind}" + (f", chosen by OOF from {metrics['auto']['candidates']}" if "auto" in metrics else "")
        note += f"; models {','.join(metrics['models'])}" if metrics["models"] != run.models else ""
        rows.append((f"{label}: {kind} before reweighting", cv_before, before.argmax(1), note))
        rows.append((f"{label}: {kind} + reweighting (arg-max)", cv_after, after.argmax(1),
                     f"reweight {metrics['reweight_final']}"))
        shown = [recorded] + ([d for d in DECISIONS if d not in (recorded, ARGMAX)] if name == SUBMISSION else [])
        for pair in shown:
            pred, record = decided[pair]
            what = " (submission.csv)" if pair == recorded else ""
            rows.append((f"{label}: {kind} + reweighting, {decision_name(pair)}{what}", None, pred,
                         decision_note(record)))
    for scale, (lr_oof, lr_test, C, _) in lr.items():
        rows.append((f"{LR_NAME} ({scale}), C={C:g}", metric_from_proba(run.label, lr_oof, run.fine_to_coarse),
                     lr_test.argmax(1), "C chosen on the same folds (CV slightly optimistic)"))
    return rows


LR_NAME = "logistic regression [mean frame, title]"
ARGMAX = ("none", False)                        # no label shift, no decoding: the reweighted arg-max
DECISIONS = [ARGMAX, ("auto", False), ("em", False), ("none", True), ("auto", True), ("em", True)]


def decision_name(pair):
    return f"label shift {pair[0]}, decoding {'on' if pair[1] else 'off'}"


def decision_note(record):
    """What the decision did on the split: label shift applied (estimated shift and its bar), labels decoding changed."""
    parts = []
    shift = record.get("label_shift")
    if shift:
        parts.append("shift applied" if shift.get("applied") else "shift not applied")
        parts += [f"{short} {shift[k]:.3f}" for k, short in (("tv_from_training_priors", "TV from the labelled priors"),
                                                             ("noise_bar", "bar")) if isinstance(shift.get(k), float)]
    if "decoding_changed" in record:
        parts.append(f"decoding changed {record['decoding_changed']} labels")
    return "; ".join(parts)


def decisions(stack_dir, proba, fine_to_coarse):
    """The fitted stack's split decided under every (label_shift, decode) pair of DECISIONS, as `stack` decides
    it (stacking.pipeline.decide with stack.json's label-shift adapter, reweighting and seed): {pair: (pred (N,),
    record)} and the pair stack.json records (the one its submission used). proba: the stacker's (N, C)."""
    from stacking.labelshift import ShiftAdapter
    from stacking.pipeline import StackOptions, decide
    meta = read_json(Path(stack_dir) / "stack.json")
    reweighter = PriorReweighter.load(Path(stack_dir) / "reweight.json")
    adapter = ShiftAdapter.from_dict(meta["label_shift_adapter"], f"{stack_dir}/stack.json: label_shift_adapter")
    options = meta.get("options", {})
    recorded = (options.get("label_shift", "auto"), bool(options.get("decode", True)))
    out = {pair: decide(proba, reweighter, adapter, np.asarray(fine_to_coarse),
                        StackOptions(label_shift=pair[0], decode=pair[1], seed=options.get("seed", 0)))
           for pair in dict.fromkeys([*DECISIONS, recorded])}
    return out, recorded


def shift_note(stack_dirs, split, labels, true, n_classes):
    """One line: the true prior shift of the scored split (total variation of its answers' class shares from the
    labelled ones) and each stack's EM estimate's distance to those answers (label shift auto can only help
    where the estimate is nearer the truth than the labelled priors are)."""
    tv = lambda p, q: 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())       # noqa: E731
    train, truth = (np.bincount(v, minlength=n_classes) / len(v) for v in (labels, true))
    parts = []
    for name, stack_dir in stack_dirs.items():
        shift = read_json(Path(stack_dir) / "metrics.json")["predictions"].get(split, {}).get("label_shift")
        if shift:
            parts.append(f"{name}: EM estimate TV {tv(shift['estimated_priors'], train):.3f} from the labelled "
                         f"priors, {tv(shift['estimated_priors'], truth):.3f} from the answers'")
    return (f"true prior shift of the {split} split: TV {tv(train, truth):.3f} between the labelled class shares and "
            "its answers'" + ("; " + "; ".join(parts) if parts else ""))


def check_submitted(stack_dir, submitted_pred, decided_pred, name):
    if (submitted_pred != decided_pred).any():
        raise RuntimeError(f"{stack_dir}: {name} differs from the saved stack's decision on "
                           f"{int((submitted_pred != decided_pred).sum())} items")


def score(rows, true, f2c, n_resamples, seed):
    boot = PairedBootstrap(true, f2c, n_resamples, seed)
    samples = {name: boot.means(pred) for name, _, pred, _ in rows}
    # the reference LR: the stronger on the test items (conservative: the margin to beat is the larger)
    lr_rows = [(n, p) for n, _, p, _ in rows if n.startswith(LR_NAME)]
    lr_name, lr_pred = max(lr_rows, key=lambda r: challenge_metric(true, r[1], f2c)["mean"]) if lr_rows else (None, None)
    sub_name = next((n for n, *_ in rows if "(the submission)" in n and "(submission.csv)" in n), None)
    out = []
    for name, cv, pred, note in rows:
        test = challenge_metric(true, pred, f2c)
        entry = {"name": name, "cv": cv, "test": test, "test_band": band(samples[name]), "note": note}
        if lr_name:
            entry.update(reference_lr=lr_name, diff_vs_lr=test["mean"] - challenge_metric(true, lr_pred, f2c)["mean"],
                         diff_vs_lr_band=band(samples[name] - samples[lr_name]))
        if sub_name:
            sub_pred = next(p for n, _, p, _ in rows if n == sub_name)
            entry["diff_vs_submission"] = test["mean"] - challenge_metric(true, sub_pred, f2c)["mean"]
            entry["diff_vs_submission_band"] = band(samples[name] - samples[sub_name])
        out.append(entry)
    return out


def markdown(entries, title):
    table = Table(title, ["method", "CV mean-F1", "held-out mean-F1", "90% band", "l2 micro", "l2 macro", "l1 micro",
                          "l1 macro", "vs LR", "90% band", "vs submission", "90% band"], echo=False)
    for e in entries:
        cv = f"{e['cv']['mean']:.4f}" if e["cv"] else ""
        t = e["test"]
        lr = ([f"{e['diff_vs_lr']:+.4f}", f"{e['diff_vs_lr_band'][0]:+.3f}..{e['diff_vs_lr_band'][1]:+.3f}"]
              if "diff_vs_lr" in e else ["", ""])
        sub = ([f"{e['diff_vs_submission']:+.4f}",
                f"{e['diff_vs_submission_band'][0]:+.3f}..{e['diff_vs_submission_band'][1]:+.3f}"]
               if "diff_vs_submission" in e else ["", ""])
        table.add(e["name"], cv, f"{t['mean']:.4f}", f"{e['test_band'][0]:.3f}..{e['test_band'][1]:.3f}",
                  *(f"{t[k]:.4f}" for k in METRIC_KEYS[1:]), *lr, *sub)
    return table


def table_text(table):
    return "\n".join(["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
                     + ["| " + " | ".join(row) + " |" for row in table.rows])


def parse_variants(pairs, only):
    variants = dict(DEFAULT_VARIANTS)
    if only is not None:
        keep = [v for v in only.split(",") if v]
        variants = {k: v for k, v in variants.items() if k in keep}
    for pair in pairs:
        name, _, args = pair.partition("=")
        variants[name] = args
    return variants


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench heldout", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="protocol cache (labeled.h5 and test.h5)")
    parser.add_argument("--data", help="its data directory (answers/test.csv); default CACHE_data")
    parser.add_argument("--work", default=None,
                        help="run, stacks and heldout.json go here [default: BENCH_CACHE/heldout/<cache name>]")
    parser.add_argument("--run", help="an existing run directory instead of WORK/run (not trained here)")
    parser.add_argument("--train-args", default="", help="extra train-neural options, e.g. '--epochs 4'")
    parser.add_argument("--train-groups", default="",
                        help="'a,b|c,d': train these model groups as concurrent processes (1 thread each)")
    parser.add_argument("--stacks", default=None,
                        help=f"comma-separated default stack variants to run (default all: {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                        help="extra stack variant: NAME and the stack options, e.g. five='--models a,b'")
    parser.add_argument("--lr-c", default="0.01,0.05,0.2", help="the LR's C grid")
    parser.add_argument("--lr", default="standard,raw",
                        help="LR probes: standard (features standardised, BENCHMARKS.md's) and/or raw")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-run", action="store_true", help="only score what is there")
    parser.add_argument("--score-models", default="",
                        help="score only these base models (e.g. the finished ones of a run still training, "
                             "with --no-run --stacks '')")
    parser.add_argument("--code", help="run the commands with this copy of the repository (e.g. a `git archive` "
                                       "of a commit, so others' edits in progress cannot change a long run)")
    parser.add_argument("--lr-only", action="store_true",
                        help="fit the LR probes from WORK/run/folds.h5 now (while the base models train), then stop")
    args = parser.parse_args(argv)
    global CODE
    CODE = Path(args.code) if args.code else REPO
    cache = Path(args.cache)
    work = Path(args.work or cache_dir("heldout", cache.name))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.run) if args.run else work / "run"
    variants = parse_variants(args.variant, args.stacks)
    log_path = work / "commands.json"
    log = read_json(log_path) if log_path.exists() else []
    started, load_start = time.time(), load()
    grid = [float(c) for c in args.lr_c.split(",")]
    if args.lr_only:
        with StoreReader(schema.store_path(cache, TEST)) as reader:
            test_ids = reader.ids
        for scale in args.lr.split(","):
            logistic_baseline(labelled_from_folds(run_dir), cache, test_ids, grid, work, scale)
        return
    if not args.no_run:
        if not args.run:
            train(cache, run_dir, args.train_args, log, [g for g in args.train_groups.split("|") if g])
            write_json(log_path, log)
        for name, stack_args in variants.items():
            stack_variant(run_dir, work / f"stack_{name}", stack_args, log)
            write_json(log_path, log)
    run = load_run(run_dir, [m for m in args.score_models.split(",") if m] or None)
    test_ids, probas = split_predictions(run, TEST)
    answers = read_answers(Path(args.data or data_dir_of(cache)) / "answers" / f"{TEST}.csv")
    index = {c: i for i, c in enumerate(run.fine_classes)}
    true = np.array([index[answers[v]] for v in test_ids])
    lr = {scale: logistic_baseline(run, cache, test_ids, grid, work, scale) for scale in args.lr.split(",") if scale}
    entries = score(collect(run, cache, work, variants, true, lr, test_ids, probas), true,
                    run.fine_to_coarse, args.resamples, args.seed)
    table = markdown(entries, f"{cache.name}: {len(run.ids):,} labelled, {len(test_ids):,} held-out items, "
                              f"{run.n_classes} classes; bands 90%, {args.resamples:,} paired resamples of the test items")
    print(table_text(table))
    write_json(work / "heldout.json", {
        "cache": str(cache), "run": str(run_dir), "n_labelled": len(run.ids), "n_test": len(test_ids),
        "n_classes": run.n_classes, "models": run.models, "code": str(CODE), "variants": variants, "lr_c_scores": {k: v[3] for k, v in lr.items()},
        "resamples": args.resamples, "seed": args.seed, "band": 0.90, "entries": entries, "commands": log,
        "load": {"start": load_start, "end": load()}, "scoring_started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started))})
    (work / "heldout.md").write_text(table_text(table) + "\n")
    write_record("heldout", argv, [table], variant=cache.name,
                 notes=["vs LR: against the stronger of the logistic-regression probes on the test items (the bar)",
                        shift_note({n: work / f"stack_{n}" for n in variants}, TEST, run.label, true, run.n_classes)])


if __name__ == "__main__":
    main()
