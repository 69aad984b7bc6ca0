"""The semi-supervised protocol of issue 10: runs with and without the unlabelled split, scored on its
hidden answers beside their out-of-fold figures, with paired bootstrap bands against the first run.

    python -m bench protocols fashion --protocol semi --titles masked --out bench_cache/semi_masked
    python run.py train-neural --cache bench_cache/semi_masked --out S/base --threads 1
    python run.py stack --model S/base --out S/base_stack --split unlabeled --threads 1
    python run.py train-neural --cache bench_cache/semi_masked --out S/pseudo --teacher S/base --threads 1
    python run.py stack --model S/pseudo --out S/pseudo_stack --split unlabeled --threads 1
    python -m bench semi --cache bench_cache/semi_masked --run base=S/base --run pseudo=S/pseudo

The stack as teacher: stack the base run with `--teach unlabeled` (S/base_stack/pseudo/fold<k>.h5, per-fold
stackers) and train a student with `--teacher S/base_stack`; add it as another --run.

A run NAME=DIR is stacked in DIR_stack (when there) for its submission row. The first run is the
reference: each row of another run gets its paired difference to the same row of the first (the same
resamples of the unlabelled items). For a run with a teacher, its fold-k pseudo-labels are scored too
(accuracy, and the share and accuracy of those above the run's confidence threshold). A stack's split is shown
as its submission.csv decided it and under every other --label-shift/--decode pair (bench.heldout.decisions).
"""
import argparse
from pathlib import Path

import numpy as np

from core import schema
from core.records import read_json, write_json
from bench.common import Table, write_record
from bench.heldout import ARGMAX, DECISIONS, check_submitted, decision_name, decision_note, decisions, shift_note
from bench.protocols import data_dir_of, read_answers
from features.store import StoreReader, rows_of
from neural.metrics import PairedBootstrap, band, challenge_metric, metric_from_proba
from neural.outputs import read_run
from stacking.reweight import PriorReweighter, class_weights
from stacking.rundir import load_run, split_predictions
from stacking.signals import build_input
from stacking.stackers import load_stacker
from stacking.submission import read_predictions

SPLIT = "unlabeled"
BENCHMARK = {"kind": "quality", "summary": "the semi-supervised protocol: runs with and without the unlabelled 80%, scored on its hidden answers with paired 90% bands"}


def rows_of_run(run_dir, true_of):
    """{row name: (OOF mean-F1 or None, predictions on the unlabelled split (N,))}: base models, average, stack."""
    run = load_run(run_dir)
    ids, probas = split_predictions(run, SPLIT)
    true = true_of(ids, run.fine_classes)
    rows = {f"base:{m}": (metric_from_proba(run.label, run.oof[m], run.fine_to_coarse)["mean"], probas[m].argmax(1))
            for m in run.models}
    rows["average"] = (metric_from_proba(run.label, np.mean(list(run.oof.values()), 0), run.fine_to_coarse)["mean"],
                       np.mean([probas[m] for m in run.models], 0).argmax(1))
    stack_dir = Path(f"{run_dir}_stack")
    if (stack_dir / "submission.csv").exists():
        submitted = read_predictions(stack_dir / "submission.csv")
        index = {c: i for i, c in enumerate(run.fine_classes)}
        metrics = read_json(stack_dir / "metrics.json")
        cv = metrics["table"].get(f"{metrics['stacker']}+reweight", {}).get("mean")
        rows["stack (submission: label shift and decoding as stack.json says)"] = \
            (cv, np.array([index[submitted[v]] for v in ids]))
        if (stack_dir / "stacker").is_dir():
            rows.update(reweighting_rows(stack_dir, run, ids, true, metrics,
                                         rows["stack (submission: label shift and decoding as stack.json says)"][1]))
    return ids, true, run, rows


def reweighting_rows(stack_dir, run, ids, true, metrics, submitted):
    """Where the stack's score on the unlabelled split comes from: its stacker's predictions before the
    long-tail reweighting, and with the reweighting candidate that scores best there (an oracle: chosen on
    the answers, so only a bound on what the choice on the labelled OOF left). The candidates' OOF and
    unlabelled scores are printed as the reweighting curve."""
    stacker = load_stacker(stack_dir / "stacker")
    reweighter = PriorReweighter.load(stack_dir / "reweight.json")
    names = read_json(stack_dir / "stack.json")["signals"]
    with StoreReader(schema.store_path(run.config["cache_dir"], SPLIT)) as reader:
        X = build_input(run.models, split_predictions(run, SPLIT)[1], reader, rows_of(reader.ids, ids, reader.path),
                        names)
    proba = stacker.predict_proba(X)                                                       # (N, C)
    decided, recorded = decisions(stack_dir, proba, run.fine_to_coarse)
    check_submitted(stack_dir, submitted, decided[recorded][0], "submission.csv")
    preds = {(kind, param): (proba * class_weights(kind, param, reweighter.class_counts_)).argmax(1)
             for kind, param, _ in reweighter.curve_}                                     # candidate -> (N,)
    curve = [(kind, param, oof, challenge_metric(true, preds[kind, param], run.fine_to_coarse)["mean"])
             for kind, param, oof in reweighter.curve_]
    print(f"{stack_dir.name}: reweighting p_c * w_c, candidates (OOF on the labelled split -> on the 80%): "
          + ", ".join(f"{k} {p:g}: {o:.3f} -> {u:.3f}" + (" [chosen]" if (k, p) == (reweighter.kind_, reweighter.param_)
                                                           else "") for k, p, o, u in curve))
    best = max(curve, key=lambda c: c[3])
    oracle = preds[best[0], best[1]]
    before = metrics["table"].get(metrics["stacker"], {}).get("mean")
    rows = {"stack before reweighting": (before, proba.argmax(1)),
            "stack, reweighting best on the 80% (oracle)": (None, oracle),
            "stack + reweighting (arg-max)": (metrics["table"].get(f"{metrics['stacker']}+reweight", {}).get("mean"),
                                              decided[ARGMAX][0])}
    for pair in DECISIONS:
        if pair not in (ARGMAX, recorded):
            rows[f"stack + reweighting, {decision_name(pair)}"] = (None, decided[pair][0])
        print(f"{stack_dir.name}: {decision_name(pair)}: {decision_note(decided[pair][1])}")
    return rows


def pseudo_accuracy(run_dir, true_of, fine_classes):
    """Per fold: accuracy of the teacher's pseudo-labels, and share / accuracy above the run's threshold."""
    from neural.pseudo import pseudo_argmax
    options = read_run(run_dir)["options"]
    if not options.get("teacher"):
        return None
    ids, folds = pseudo_argmax(run_dir, read_run(run_dir)["n_folds"])
    true = true_of(ids, fine_classes)
    out = {}
    for k, (pred, conf) in folds.items():
        kept = conf >= options["pseudo_threshold"]
        out[k] = {"accuracy": float(np.mean(pred == true)), "kept": float(kept.mean()),
                  "kept_accuracy": float(np.mean(pred[kept] == true[kept])) if kept.any() else None}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench semi", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="semi protocol cache (labeled.h5, unlabeled.h5)")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR",
                        help="a run (the first is the reference); its stack is RUN_DIR_stack when there")
    parser.add_argument("--out", help="JSON of the table (default: next to the first run)")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args(argv)
    answers = read_answers(data_dir_of(Path(args.cache)) / "answers" / f"{SPLIT}.csv")

    def true_of(ids, fine_classes):
        index = {c: i for i, c in enumerate(fine_classes)}
        return np.array([index[answers[v]] for v in ids])

    runs = [pair.partition("=")[::2] for pair in args.run]
    scored, boot, ref_ids = {}, None, None
    for name, run_dir in runs:
        ids, true, run, rows = rows_of_run(run_dir, true_of)
        if boot is None:
            boot, ref_ids = PairedBootstrap(true, run.fine_to_coarse, args.resamples, seed=0), ids
        elif not np.array_equal(ids, ref_ids):
            raise SystemExit(f"{run_dir}: its unlabelled ids differ from the first run's")
        scored[name] = {row: (cv, pred, boot.means(pred)) for row, (cv, pred) in rows.items()}
        scored[name]["_pseudo"] = pseudo_accuracy(run_dir, true_of, run.fine_classes)
    ref_name = runs[0][0]
    table = {}
    shown = Table(f"{Path(args.cache).name}: out of fold on the labelled 20%, scored on the hidden 80%; bands 90%, "
                  f"{args.resamples:,} paired resamples", ["row", "run", "OOF mean-F1 (20%)", "mean-F1 on the 80%",
                  "90% band", f"vs {ref_name}", "90% band", "macro over the 80%'s own classes (vs ref)",
                  "items in classes the 80% lacks"])
    for name, _ in runs:
        for row, (cv, pred, samples) in ((r, v) for r, v in scored[name].items() if r != "_pseudo"):
            score = float(challenge_metric(boot.true, pred, boot.f2c)["mean"])
            # the protocol leaves every class one labelled item, so classes of one item in all are absent from
            # the 80%: one prediction of such a class adds a class of F1 0 to the challenge's macro
            own = float(challenge_metric(boot.true, pred, boot.f2c, truth_classes_only=True)["mean"])
            phantom = int(np.isin(pred, np.setdiff1d(pred, boot.true)).sum())
            entry = {"oof": cv, "score": score, "band": band(samples), "own_classes": own, "phantom_items": phantom}
            diff = ["", ""]
            if name != ref_name and row in scored[ref_name]:
                ref = scored[ref_name][row]
                d = samples - ref[2]
                entry["diff"] = score - float(challenge_metric(boot.true, ref[1], boot.f2c)["mean"])
                entry["diff_band"] = band(d)
                diff = [f"{entry['diff']:+.4f}", f"{entry['diff_band'][0]:+.3f}..{entry['diff_band'][1]:+.3f}"]
            table.setdefault(row, {})[name] = entry
            cv_text = f"{cv:.4f}" if cv is not None else ""
            ref_own = table.get(row, {}).get(ref_name, {}).get("own_classes")
            own_vs = f" ({own - ref_own:+.4f})" if name != ref_name and ref_own is not None else ""
            shown.add(row, name, cv_text, f"{score:.4f}", f"{entry['band'][0]:.3f}..{entry['band'][1]:.3f}", *diff,
                      f"{own:.4f}{own_vs}", phantom)
    notes = []
    for name, run_dir in runs:
        stack_dir = Path(f"{run_dir}_stack")
        if (stack_dir / "metrics.json").exists():
            notes.append(f"{name}: " + shift_note({"stack": stack_dir}, SPLIT, load_run(run_dir).label, boot.true,
                                                  len(boot.f2c)))
    for name, _ in runs:
        if scored[name]["_pseudo"]:
            for k, p in scored[name]["_pseudo"].items():
                notes.append(f"{name} fold {k} pseudo-labels: {p['accuracy']:.3f} right; {p['kept']:.3f} of rows above "
                             f"the threshold, {p['kept_accuracy']:.3f} of them right")
    print("\n".join(notes))
    out = Path(args.out) if args.out else Path(runs[0][1]).parent / "semi.json"
    write_json(out, {"cache": args.cache, "runs": dict(runs), "table": table,
                     "pseudo": {n: scored[n]["_pseudo"] for n, _ in runs}, "resamples": args.resamples})
    write_record("semi", argv, [shown], notes=notes, variant=Path(args.cache).name)


if __name__ == "__main__":
    main()
