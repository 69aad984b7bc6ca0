"""`stack`: compare base models, their average and the stackers on the run's folds; fit and save the stack.

Honest scores: every stacker is scored by its own out-of-fold pass over RUN_DIR/folds.h5 (the folds
the base models' OOF probabilities came from), and the long-tail reweighting of outer fold k is tuned
on an inner out-of-fold pass over the other folds only (nested), never on the predictions it is
scored on. Then the stacker is refit on all labelled videos and the reweighting tuned on the full
out-of-fold predictions, and both predict the other splits.
"""
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from features import schema
from features.records import write_json
from features.store import StoreReader, rows_of
from neural.metrics import metric_from_proba
from stacking.plots import plot_per_class_f1
from stacking.reweight import PriorReweighter
from stacking.rundir import RunDirError, available_splits, load_run, split_predictions
from stacking.signals import build_input, signal_names_for
from stacking.stackers import check_overrides, make_stacker, stacker_params
from stacking.submission import write_predictions


@dataclass
class StackOptions:
    models: tuple = ()              # base models; empty = every model in run.json
    stacker: str = "rerank"         # the stacker fitted and saved: a kind of stacking.stackers.STACKERS
    params: dict = field(default_factory=dict)   # stacker parameters {"[kind.]name": value} over the defaults
    reweight: str = "auto"          # "power", "inverse" or "auto" (the better of the two, chosen nested)
    use_shift_stats: bool = True    # add agg/shift_stats to the signals when the store has it
    split: str = "test"             # split written to submission.csv; "" for none
    threads: int = 1                 # LightGBM threads: 2 ran 30-50x slower than 1 on the loaded 2-core machine
    seed: int = 0
    compare: tuple = ("logreg",)    # extra stackers scored side by side (not saved)

    @property
    def kinds(self):
        """The stackers used: the saved one, then the compared ones."""
        return [self.stacker, *[k for k in self.compare if k != self.stacker]]


def stacker_maker(kind, options, fine_to_coarse):
    """A function making a fresh, unfitted stacker of `kind`: its declared defaults, the values the stack
    shares with every stacker declaring them (threads, seed, fine_to_coarse), then the options' params."""
    shared = {"threads": options.threads, "seed": options.seed,
              "fine_to_coarse": [int(c) for c in fine_to_coarse]}
    params = stacker_params(kind, shared, options.params)
    return lambda: make_stacker(kind, **params)


def cross_val_predict(make, X, y, fold, desc=None):
    """(N, C) out-of-fold predictions of a fresh stacker per fold over `fold` (N,)."""
    out = np.zeros((len(X), X.n_classes), np.float32)
    folds = np.unique(fold)
    for k in tqdm(folds, desc=desc, leave=False, disable=desc is None):
        train, held = fold != k, fold == k
        out[held] = make().fit(X.take(train), y[train]).predict_proba(X.take(held))
    return out


def nested_reweight(make, X, y, fold, stack_oof, fine_to_coarse, kind):
    """Reweight each outer fold with a parameter tuned on an inner OOF pass over the other folds."""
    if len(np.unique(fold)) < 3:
        raise RunDirError(f"the run has {len(np.unique(fold))} folds; tuning the reweighting inside the "
                          "stacker's cross-validation needs at least 3 (train-neural --folds 3 or more)")
    out, chosen = np.zeros_like(stack_oof), []
    for k in tqdm(np.unique(fold), desc="nested reweighting", leave=False):
        train, held = fold != k, fold == k
        inner = cross_val_predict(make, X.take(train), y[train], fold[train])
        counts = np.bincount(y[train], minlength=X.n_classes)
        rw = PriorReweighter(kind).fit(inner, y[train], counts, fine_to_coarse)
        out[held] = rw.transform(stack_oof[held])
        chosen.append({"fold": int(k), "kind": rw.kind_, "param": rw.param_, "inner_score": rw.score_})
    return out, chosen


def low_quartile_f1(y, pred_before, pred_after, counts):
    """Macro-F1 over the classes in the lowest quartile of training frequency, before and after."""
    present = np.where(counts > 0)[0]
    cut = np.percentile(counts[present], 25)
    rare = present[counts[present] <= cut]
    before = f1_score(y, pred_before, labels=rare, average="macro", zero_division=0)
    after = f1_score(y, pred_after, labels=rare, average="macro", zero_division=0)
    return {"n_classes": int(len(rare)), "max_count": int(cut), "macro_f1_before": float(before),
            "macro_f1_after": float(after), "change": float(after - before)}


def _timed(timings, name, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    timings[name] = round(time.perf_counter() - start, 2)
    return out


def evaluate(run, X, options, timings):
    """The comparison table on the run's folds; returns (table, oof of the main stack, reweighted, extra)."""
    y, fold, f2c = run.label, run.fold, run.fine_to_coarse
    table = {f"base:{m}": metric_from_proba(y, run.oof[m], f2c) for m in run.models}
    table["average"] = metric_from_proba(y, X.probas.mean(axis=0), f2c)
    for kind in options.compare:
        oof = _timed(timings, f"oof_{kind}", cross_val_predict, stacker_maker(kind, options, f2c), X, y, fold, kind)
        table[kind] = metric_from_proba(y, oof, f2c)
    make = stacker_maker(options.stacker, options, f2c)
    stack_oof = _timed(timings, f"oof_{options.stacker}", cross_val_predict, make, X, y, fold, options.stacker)
    table[options.stacker] = metric_from_proba(y, stack_oof, f2c)
    reweighted, chosen = _timed(timings, "nested_reweight", nested_reweight, make, X, y, fold, stack_oof,
                                f2c, options.reweight)
    table[f"{options.stacker}+reweight"] = metric_from_proba(y, reweighted, f2c)
    # for contrast only: the same reweighting tuned on the predictions it is scored on (optimistic)
    counts = np.bincount(y, minlength=run.n_classes)
    same = PriorReweighter(options.reweight).fit(stack_oof, y, counts, f2c)
    table[f"{options.stacker}+reweight (tuned on its own scores; optimistic)"] = \
        metric_from_proba(y, same.transform(stack_oof), f2c)
    extra = {"reweight_per_fold": chosen,
             "low_quartile": low_quartile_f1(y, stack_oof.argmax(1), reweighted.argmax(1), counts)}
    return table, stack_oof, reweighted, extra


def stack(run_dir, out_dir, options=None):
    """Score, fit and save the stack of RUN_DIR into OUT_DIR; returns the metrics dict written."""
    options = options or StackOptions()
    check_overrides(options.params, options.kinds)       # before any work: unknown kinds and parameters
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    with threadpool_limits(options.threads):
        run = _timed(timings, "load_run", load_run, run_dir, options.models)
        splits = _check_split(run, options.split)
        X, names = _timed(timings, "signals", labelled_input, run, options)
        table, stack_oof, reweighted, extra = evaluate(run, X, options, timings)
        stacker, reweighter = _timed(timings, "refit", refit, run, X, stack_oof, options)
        save_stack(out_dir, run, stacker, reweighter, names, options)
        written = _timed(timings, "predict_splits", predict_splits, run, splits, stacker, reweighter,
                         names, out_dir, options)
    counts = np.bincount(run.label, minlength=run.n_classes)
    plot_per_class_f1(out_dir / "per_class_f1.png", run.label, stack_oof.argmax(1), reweighted.argmax(1),
                      counts, options.stacker)
    metrics = {"run_dir": str(run.run_dir), "fingerprint": run.fingerprint, "models": run.models,
               "n_videos": len(run.ids), "n_folds": run.n_folds, "n_classes": run.n_classes,
               "signals": names, "options": _options_json(options), "table": table,
               "reweight_final": {"kind": reweighter.kind_, "param": reweighter.param_},
               **extra, "predictions": written, "times_s": timings, **stacker.report(X, run.label)}
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def labelled_input(run, options):
    """(StackInput of the labelled videos' OOF probabilities and signals, the signals' names)."""
    with StoreReader(run.store_path) as reader:
        names = signal_names_for(reader, len(run.models), run.n_classes, options.use_shift_stats)
        rows = rows_of(reader.ids, run.ids, reader.path)
        return build_input(run.models, run.oof, reader, rows, names), names


def _options_json(options):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()}


def _check_split(run, split):
    """Splits to predict after the refit; refuses a submission split the run has no predictions for."""
    splits = available_splits(run)
    if split and split not in splits:
        raise RunDirError(f"{run.run_dir}: the base models have no predictions for split '{split}' "
                          f"(they have: {', '.join(splits) or 'none'}); pass --split NAME, or --split '' "
                          "for no submission")
    return splits


def refit(run, X, stack_oof, options):
    """The stacker on all labelled videos; the reweighting tuned on its full out-of-fold predictions."""
    stacker = stacker_maker(options.stacker, options, run.fine_to_coarse)().fit(X, run.label)
    counts = np.bincount(run.label, minlength=run.n_classes)
    reweighter = PriorReweighter(options.reweight).fit(stack_oof, run.label, counts, run.fine_to_coarse)
    return stacker, reweighter


def save_stack(out_dir, run, stacker, reweighter, signal_names, options):
    """stacker/, reweight.json, then stack.json: a stack directory with stack.json is whole."""
    stacker.save(out_dir / "stacker")
    reweighter.save(out_dir / "reweight.json")
    write_json(out_dir / "stack.json",
               {"run_dir": str(run.run_dir), "fingerprint": run.fingerprint, "models": run.models,
                "signals": signal_names, "fine_classes": run.fine_classes,
                "fine_to_coarse": run.fine_to_coarse.tolist(), "store_config": run.store_config,
                "options": _options_json(options)})


def predict_splits(run, splits, stacker, reweighter, names, out_dir, options):
    """Final predictions of every split the run has; the submission split goes to submission.csv."""
    written = {}
    for split in splits:
        ids, probas = split_predictions(run, split)
        with StoreReader(schema.store_path(run.config["cache_dir"], split)) as reader:   # opened once
            X = build_input(run.models, probas, reader, rows_of(reader.ids, ids, reader.path), names)
            pred = reweighter.transform(stacker.predict_proba(X)).argmax(axis=1)
            name = "submission.csv" if split == options.split else f"predictions_{split}.csv"
            write_predictions(out_dir / name, ids, pred, run.fine_classes, reader)
        written[split] = {"file": name, "rows": int(len(ids))}
    return written
