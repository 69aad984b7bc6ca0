"""`stack`: compare base models, their average and the stackers on the run's folds; fit and save the stack.

Honest scores: every stacker is scored by its own out-of-fold pass over RUN_DIR/folds.h5 (the folds
the base models' OOF probabilities came from), and the long-tail reweighting of outer fold k is tuned
on an inner out-of-fold pass over the other folds only (nested), never on the predictions it is
scored on. Then the stacker is refit on all labelled videos and the reweighting tuned on the full
out-of-fold predictions, and both predict the other splits.

`--stacker auto` scores the incumbent (rerank), the plain average and the --compare stackers by their
OOF passes and keeps the incumbent unless another beats it beyond the noise: its OOF mean-F1 minus the
incumbent's, over a paired bootstrap of the labelled videos, has a 90% band above zero; among those
that do, the best by OOF mean-F1 is fitted. Without the band a small OOF edge picked stackers that lost
on unseen items (ucf14: lgbm +0.0015 OOF, -0.054 held out). The chosen score is still optimistic (the
choice was made on the predictions it is scored on), so (unless nested_choice is off) auto is also
chosen inside each outer fold by the same rule on inner OOF passes over the other folds only, as the
reweighting is tuned, and that honest score is reported. It is not the default: where it departed
from rerank it lost on held-out items three times in four (the held-out protocol, bench/README.md).
"""
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.metrics import f1_score
from sklearn.model_selection import PredefinedSplit
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from core import schema
from core.owned import OwnedFiles
from core.records import write_json
from features.store import StoreReader, rows_of
from neural.metrics import PairedBootstrap, band, metric_from_proba
from stacking.decode import decode
from stacking.labelshift import ShiftAdapter
from stacking.plots import plot_per_class_f1
from stacking.reweight import PriorReweighter
from stacking.rundir import RunDirError, available_splits, load_run, split_predictions
from stacking.signals import build_input, signal_names_for
from stacking.stackers import check_overrides, make_stacker, stacker_origin, stacker_params
from stacking.submission import write_predictions
from stacking.teach import check_teach, clear_pseudo, teach


# every file `stack` writes in its --out (model/ and its siblings are the packaging's: inference/package.py)
STACK_DIR_FILES = OwnedFiles(["stack.json", "reweight.json", "metrics.json", "submission.csv", "predictions_*.csv",
                              "per_class_f1.png", "stacker/*", "pseudo/*", "model/**", "model.tmp/**", "model.old/**"])
AUTO = "auto"                       # --stacker auto: the incumbent unless another beats it beyond the noise
INCUMBENT = "rerank"                # what auto keeps unless a candidate's gain has its band above zero
AVERAGE = "average"                 # always among auto's candidates (it costs nothing)
AUTO_RESAMPLES = 200                # paired bootstrap resamples of the labelled videos behind each choice
AUTO_LEVEL = 0.90                   # the band's level
AUTO_RULE = (f"{INCUMBENT} is kept unless a candidate's OOF mean-F1 gain over it has its paired bootstrap "
             f"{AUTO_LEVEL:.0%} band ({AUTO_RESAMPLES} resamples of the labelled videos) above zero; among "
             "those, the best by OOF mean-F1")
OPTIMISM_NOTE = ("the chosen stacker's OOF mean-F1 is optimistic: it was chosen on the same out-of-fold "
                 "predictions it is scored on")


@dataclass
class StackOptions:
    models: tuple = ()              # base models; empty = every model in run.json
    stacker: str = "rerank"         # the stacker fitted and saved: a kind of stacking.stackers.STACKERS,
                                    # or "auto": rerank, the average and `compare` scored by their OOF
                                    # passes, rerank kept unless one beats it beyond the noise (AUTO_RULE)
    params: dict = field(default_factory=dict)   # stacker parameters {"[kind.]name": value} over the defaults
    reweight: str = "auto"          # "power", "inverse" or "auto" (the better of the two, chosen nested)
    use_shift_stats: bool = True    # add agg/shift_stats to the signals when the store has it
    split: str = "test"             # split written to submission.csv; "" for none
    threads: int = 1                 # LightGBM threads: 2 ran 30-50x slower than 1 on the loaded 2-core machine
    seed: int = 0
    compare: tuple = ("logreg",)    # extra stackers scored side by side (not saved); auto's candidates too
    nested_choice: bool = True      # auto only: also choose inside each outer fold (the honest score of auto)
    label_shift: str = "none"       # a predicted split's priors by EM on its calibrated probabilities
                                    # (stacking/labelshift.py), always estimated and recorded: "auto" adjusts
                                    # when the shift is beyond the estimator's no-shift noise on the folds,
                                    # "em" always, "none" never (the default: adjusting lowered the held-out
                                    # scores measured, docs/results.md: heldout.tail_masked, semi)
    decode: bool = True             # metric-aware decoding of each predicted split (stacking/decode.py)
    teach: str = ""                 # an unlabelled split of the run's cache: write STACK_DIR/pseudo/fold<k>.h5,
                                    # per-fold stackers' pseudo-labels for train-neural --teacher (stacking/teach.py)

    @property
    def kinds(self):
        """The stackers used: the saved one, then the compared ones (auto: the incumbent, the average and
        the compared ones)."""
        first = [INCUMBENT, AVERAGE] if self.stacker == AUTO else [self.stacker]
        return [*first, *[k for k in self.compare if k not in first]]


def stacker_for(kind, options, fine_to_coarse):
    """A fresh, unfitted stacker (a scikit-learn estimator) of `kind`: its declared defaults, the values the
    stack shares with every stacker declaring them (threads, seed, fine_to_coarse), then the options' params."""
    shared = {"threads": options.threads, "seed": options.seed,
              "fine_to_coarse": [int(c) for c in fine_to_coarse]}
    return make_stacker(kind, **stacker_params(kind, shared, options.params))


def oof_proba(stacker, X, y, fold, desc=None):
    """(N, C) out-of-fold probabilities: per fold of `fold` (N,), a clone of `stacker` fitted on the others.

    Not sklearn's cross_val_predict(stacker, X, y, cv=PredefinedSplit(fold), method="predict_proba"): it
    refuses X, a StackInput (not an array), and it re-encodes y to the classes present, so a stacker would
    learn class-map classes under other numbers, and a class of the run's C with no labelled video fails
    its column alignment (tests/test_stack_sklearn.py shows both)."""
    out = np.zeros((len(X), X.n_classes), np.float32)
    split = PredefinedSplit(fold)
    for train, held in tqdm(split.split(), total=split.get_n_splits(), desc=desc, leave=False,
                            disable=desc is None):
        out[held] = clone(stacker).fit(X.take(train), y[train]).predict_proba(X.take(held))
    return out


def _check_nested_folds(fold):
    if len(np.unique(fold)) < 3:
        raise RunDirError(f"the run has {len(np.unique(fold))} folds; tuning the reweighting inside the "
                          "stacker's cross-validation needs at least 3 (train-neural --folds 3 or more)")


def nested_reweight(stacker, X, y, fold, stack_oof, fine_to_coarse, kind):
    """Reweight each outer fold with a parameter tuned on an inner OOF pass over the other folds:
    nested_choice with one candidate. Returns (reweighted OOF (N, C), per-fold reweights)."""
    reweighted, rw_folds, *_ = nested_choice({"stack": stacker}, X, y, fold, {"stack": stack_oof}, "stack",
                                             fine_to_coarse, kind)
    return reweighted, rw_folds


def auto_choice(y, oofs, fine_to_coarse, seed):
    """AUTO_RULE on OOF probabilities {kind: (N, C)} of the labelled videos y (N,); oofs holds INCUMBENT.
    Returns (the chosen kind, {kind: OOF mean-F1}, {other kind: {"gain": mean-F1 minus the incumbent's,
    "band": its paired bootstrap band}})."""
    boot = PairedBootstrap(y, fine_to_coarse, AUTO_RESAMPLES, seed)
    preds = {kind: p.argmax(axis=1) for kind, p in oofs.items()}
    scores = {kind: metric_from_proba(y, p, fine_to_coarse)["mean"] for kind, p in oofs.items()}
    incumbent = boot.means(preds[INCUMBENT])                                     # (B,)
    gains = {kind: {"gain": scores[kind] - scores[INCUMBENT],
                    "band": band(boot.means(preds[kind]) - incumbent, AUTO_LEVEL)}
             for kind in oofs if kind != INCUMBENT}
    beating = [kind for kind, g in gains.items() if g["band"][0] > 0]
    return (max(beating, key=scores.get) if beating else INCUMBENT), scores, gains


def nested_choice(stackers, X, y, fold, oofs, chosen, fine_to_coarse, kind, seed=0):
    """Auto chosen inside each outer fold, and the nested reweighting of the stacker chosen on all folds.

    For outer fold k, every candidate in `stackers` ({kind: unfitted stacker}) gets an inner OOF pass over
    the other folds; AUTO_RULE on those passes is fold k's choice (one candidate: it), and its outer OOF rows
    `oofs[choice][k]` (fitted without fold k) are its predictions, reweighted as tuned on its inner pass. The
    stacker `chosen` on all folds is reweighted from the same inner passes, as nested_reweight does. Returns
    (chosen's reweighted OOF, its per-fold reweights, auto's nested OOF, auto's nested reweighted OOF,
    per-fold choices).
    """
    _check_nested_folds(fold)
    reweighted, rw_folds = np.zeros_like(oofs[chosen]), []
    auto_oof, auto_rw, picks = np.zeros_like(oofs[chosen]), np.zeros_like(oofs[chosen]), []
    for k in tqdm(np.unique(fold), desc="nested choice and reweighting", leave=False):
        train, held = fold != k, fold == k
        inner = {c: oof_proba(s, X.take(train), y[train], fold[train]) for c, s in stackers.items()}
        pick, scores, gains = auto_choice(y[train], inner, fine_to_coarse, seed) if len(inner) > 1 else \
            (chosen, None, None)
        counts = np.bincount(y[train], minlength=X.n_classes)
        rws = {c: PriorReweighter(kind).fit(inner[c], y[train], counts, fine_to_coarse) for c in {chosen, pick}}
        reweighted[held] = rws[chosen].transform(oofs[chosen][held])
        rw = rws[chosen]
        rw_folds.append({"fold": int(k), "kind": rw.kind_, "param": rw.param_, "inner_score": rw.score_})
        auto_oof[held] = oofs[pick][held]
        auto_rw[held] = rws[pick].transform(oofs[pick][held])
        picks.append({"fold": int(k), "chosen": pick, "inner_scores": scores, "inner_gains": gains})
    return reweighted, rw_folds, auto_oof, auto_rw, picks


def describe_auto(auto):
    """One line: what --stacker auto chose, each candidate's gain with its band, how optimistic the score is."""
    scores = ", ".join(f"{k} {v:.4f}" for k, v in auto["candidates"].items())
    gains = ", ".join(f"{k} {g['gain']:+.4f} [{g['band'][0]:+.4f}, {g['band'][1]:+.4f}]" for k, g in auto["gains"].items())
    line = (f"auto: chose {auto['chosen']} (OOF mean-F1 {auto['chosen_oof_mean']:.4f}; candidates: {scores}; "
            f"gain over {auto['incumbent']} with its {AUTO_LEVEL:.0%} band: {gains}; rule: {auto['rule']}); "
            f"{auto['optimistic']}")
    nested = auto["nested"]
    if nested:
        picks = ",".join(p["chosen"] for p in nested["per_fold"])
        return (line + f"; chosen inside each outer fold ({picks}) auto scores {nested['mean']:.4f} "
                f"({nested['reweighted_mean']:.4f} reweighted), an optimism of {nested['optimism']:+.4f}")
    return line + "; not measured inside the outer folds (--no-nested-choice)"


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
    """The comparison table on the run's folds; returns (table, the stacker kind to fit, its OOF,
    reweighted, extra). With --stacker auto that kind is the best stacker by OOF mean-F1."""
    y, fold, f2c = run.label, run.fold, run.fine_to_coarse
    table = {f"base:{m}": metric_from_proba(y, run.oof[m], f2c) for m in run.models}
    table["average"] = metric_from_proba(y, X.probas.mean(axis=0), f2c)
    auto = options.stacker == AUTO
    scored = options.kinds if auto else [*[k for k in options.compare if k != options.stacker], options.stacker]
    stackers = {kind: stacker_for(kind, options, f2c) for kind in scored}
    oofs = {}
    for kind in scored:
        oofs[kind] = _timed(timings, f"oof_{kind}", oof_proba, stackers[kind], X, y, fold, kind)
        table[kind] = metric_from_proba(y, oofs[kind], f2c)
    extra = {}
    if auto:
        chosen, scores, gains = auto_choice(y, oofs, f2c, options.seed)
        extra["auto"] = {"candidates": scores, "chosen": chosen, "incumbent": INCUMBENT, "gains": gains,
                         "rule": AUTO_RULE, "chosen_oof_mean": scores[chosen], "optimistic": OPTIMISM_NOTE,
                         "nested": None}
    else:
        chosen = options.stacker
    stack_oof = oofs[chosen]
    if auto and options.nested_choice:
        reweighted, per_fold, auto_oof, auto_rw, picks = _timed(
            timings, "nested_choice_and_reweight", nested_choice, stackers, X, y, fold, oofs, chosen, f2c,
            options.reweight, options.seed)
        table["auto (chosen inside each outer fold; honest)"] = metric_from_proba(y, auto_oof, f2c)
        table["auto+reweight (both inside each outer fold; honest)"] = metric_from_proba(y, auto_rw, f2c)
        nested = table["auto (chosen inside each outer fold; honest)"]["mean"]
        extra["auto"]["nested"] = {
            "mean": nested, "reweighted_mean": table["auto+reweight (both inside each outer fold; honest)"]["mean"],
            "optimism": extra["auto"]["chosen_oof_mean"] - nested, "per_fold": picks}
    else:
        reweighted, per_fold = _timed(timings, "nested_reweight", nested_reweight, stackers[chosen], X, y, fold,
                                      stack_oof, f2c, options.reweight)
        if auto:
            extra["auto"]["nested_not_measured"] = ("nested_choice is off: auto was not chosen inside the "
                                                    "outer folds, so no honest score of the choice was measured")
    table[f"{chosen}+reweight"] = metric_from_proba(y, reweighted, f2c)
    # for contrast only: the same reweighting tuned on the predictions it is scored on (optimistic)
    counts = np.bincount(y, minlength=run.n_classes)
    same = PriorReweighter(options.reweight).fit(stack_oof, y, counts, f2c)
    table[f"{chosen}+reweight (tuned on its own scores; optimistic)"] = \
        metric_from_proba(y, same.transform(stack_oof), f2c)
    extra.update({"reweight_per_fold": per_fold,
                  "low_quartile": low_quartile_f1(y, stack_oof.argmax(1), reweighted.argmax(1), counts)})
    return table, chosen, stack_oof, reweighted, extra


def stack(run_dir, out_dir, options=None):
    """Score, fit and save the stack of RUN_DIR into OUT_DIR; returns the metrics dict written."""
    options = options or StackOptions()
    check_overrides(options.params, options.kinds)       # before any work: unknown kinds and parameters
    out_dir = Path(out_dir)
    STACK_DIR_FILES.refuse_foreign(out_dir, RunDirError, "stack")     # it replaces its own files, no other
    timings = {}
    with threadpool_limits(options.threads):
        run = _timed(timings, "load_run", load_run, run_dir, options.models)
        splits = _check_split(run, options.split)
        if options.teach:                               # the split and fold models, before anything is fitted
            check_teach(run, options.teach)
        X, names = _timed(timings, "signals", labelled_input, run, options)
        table, chosen, stack_oof, reweighted, extra = evaluate(run, X, options, timings)
        # auto fits exactly what --stacker <chosen> fits (same parameters, same OOF for the reweighting)
        stacker, reweighter = _timed(timings, "refit", refit, run, X, stack_oof, replace(options, stacker=chosen))
        adapter = _timed(timings, "label_shift_fit", ShiftAdapter().fit, stack_oof, run.label, run.fold,
                         run.n_classes)
        extra["decode_oof_per_fold"] = _timed(timings, "decode_oof", decode_per_fold, run, stack_oof, reweighted,
                                              adapter, options)
        out_dir.mkdir(parents=True, exist_ok=True)        # only now: a failure before leaves no empty --out
        save_stack(out_dir, run, stacker, reweighter, names, options, adapter)
        written = _timed(timings, "predict_splits", predict_splits, run, splits, stacker, reweighter,
                         names, out_dir, options, adapter)
        clear_pseudo(out_dir)                           # an earlier stack's teacher files are stale now
        if options.teach:
            extra["teach"] = _timed(timings, "teach", teach, run, X, names,
                                    stacker_for(chosen, options, run.fine_to_coarse), chosen, options.teach,
                                    out_dir, options.threads)
    counts = np.bincount(run.label, minlength=run.n_classes)
    plot_per_class_f1(out_dir / "per_class_f1.png", run.label, stack_oof.argmax(1), reweighted.argmax(1),
                      counts, chosen)
    metrics = {"run_dir": str(run.run_dir), "fingerprint": run.fingerprint, "models": run.models,
               "n_videos": len(run.ids), "n_folds": run.n_folds, "n_classes": run.n_classes,
               "signals": names, "options": _options_json(options), "stacker": chosen, "table": table,
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
    stacker = stacker_for(options.stacker, options, run.fine_to_coarse).fit(X, run.label)
    counts = np.bincount(run.label, minlength=run.n_classes)
    reweighter = PriorReweighter(options.reweight).fit(stack_oof, run.label, counts, run.fine_to_coarse)
    return stacker, reweighter


def save_stack(out_dir, run, stacker, reweighter, signal_names, options, adapter):
    """stacker/, reweight.json, then stack.json (with the label-shift adapter: its calibration, the training
    priors and the folds' no-shift noise): a stack directory with stack.json is whole."""
    stacker.save(out_dir / "stacker", stacker_origin(stacker.kind))
    reweighter.save(out_dir / "reweight.json")
    write_json(out_dir / "stack.json",
               {"run_dir": str(run.run_dir), "fingerprint": run.fingerprint, "models": run.models,
                "signals": signal_names, "fine_classes": run.fine_classes,
                "fine_to_coarse": run.fine_to_coarse.tolist(), "store_config": run.store_config,
                "stacker": stacker.kind, "options": _options_json(options),
                "label_shift_adapter": adapter.to_dict()})


def decide(proba, reweighter, adapter, fine_to_coarse, options):
    """The labels of one predicted split from the stacker's probabilities (N, C): label shift estimated (and
    applied per options.label_shift as a prior ratio per class), the tuned reweighting, then metric-aware
    decoding (options.decode) weighing the calibrated, shift-adjusted probabilities.
    -> (pred (N,), record: label shift, decoding decisions, labels changed from the reweighted arg-max)."""
    record, weights = {}, 1.0
    calibrated = adapter.calibrator_.transform(proba)
    if options.label_shift == "none":                               # estimated and reported, not applied
        auto_rule = adapter.adapt(proba)[2]
        record["label_shift"] = {**auto_rule, "applied": False, "auto_would_apply": auto_rule["applied"]}
    else:
        weights, calibrated, record["label_shift"] = adapter.adapt(proba, force=options.label_shift == "em")
    scores = reweighter.transform(proba * weights)                  # (N, C) today's scores, shift-corrected
    pred = scores.argmax(axis=1)
    if options.decode:
        decoded, record["decoding"] = decode(scores, calibrated, fine_to_coarse, seed=options.seed)
        record["decoding_changed"] = int((decoded != pred).sum())
        pred = decoded
    return pred, record


def decode_per_fold(run, stack_oof, reweighted, adapter, options):
    """Decoding scored on each outer fold as a split of its own (the metric's classes are the fold's truth or
    predictions): the mean over folds of mean-F1 before and after. The calibration was fitted on all OOF rows."""
    if not options.decode:
        return None
    from stacking.reweight import challenge_mean
    before, after = [], []
    for k in np.unique(run.fold):
        held = run.fold == k
        y, scores = run.label[held], reweighted[held]
        pred, _ = decode(scores, adapter.calibrator_.transform(stack_oof[held]), run.fine_to_coarse, seed=options.seed)
        before.append(challenge_mean(y, scores.argmax(1), run.fine_to_coarse, run.n_classes))
        after.append(challenge_mean(y, pred, run.fine_to_coarse, run.n_classes))
    return {"mean_before": float(np.mean(before)), "mean_after": float(np.mean(after)),
            "per_fold_gain": [float(a - b) for a, b in zip(after, before)]}


def predict_splits(run, splits, stacker, reweighter, names, out_dir, options, adapter):
    """Final predictions of every split the run has; the submission split goes to submission.csv."""
    written = {}
    for split in splits:
        ids, probas = split_predictions(run, split)
        with StoreReader(schema.store_path(run.config["cache_dir"], split)) as reader:   # opened once
            X = build_input(run.models, probas, reader, rows_of(reader.ids, ids, reader.path), names)
            pred, record = decide(stacker.predict_proba(X), reweighter, adapter, run.fine_to_coarse, options)
            name = "submission.csv" if split == options.split else f"predictions_{split}.csv"
            write_predictions(out_dir / name, ids, pred, run.fine_classes, reader)
        written[split] = {"file": name, "rows": int(len(ids)), **record}
    return written
