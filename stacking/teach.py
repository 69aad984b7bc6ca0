"""`stack --teach SPLIT`: the stack as the teacher of a student run's pseudo-labels, out-of-fold honest.

    pseudo-labels of fold k = stacker_k(the base models' fold-k models' softmax on SPLIT, with its signals)
    stacker_k = the stack's stacker kind fitted on the OOF rows of the folds other than k only

The base models' fold-k models never saw fold k's labelled rows, and neither did stacker_k (it is the fit
oof_proba scores fold k with), so an unlabelled near-duplicate of a fold-k video carries no label of
fold k into fold k's student. The stack's final stacker (fitted on every fold) would: it is never used here.

    STACK_DIR/pseudo/fold<k>.h5   proba (N_unlab, C) float16 and its record (JSON attr): neural/pseudo.py's
                                  format (format, fold, teacher {path, kind "stack", run_dir, models, labels},
                                  teacher_fold_sha256, unlabelled {split, store, n_videos, digest}) and
                                  stacker {kind, fitted_on, n_rows, run fingerprint}

`train-neural --teacher STACK_DIR` copies them into its RUN_DIR/pseudo/ (neural.pseudo.stacked_record checks
the teacher run's fold models and the unlabelled store first). Cost: one pass of every base model's fold-k
model over SPLIT per fold (as a base-model teacher costs) and one stacker fit per fold.
"""
import json
from pathlib import Path

import h5py
import numpy as np
import torch
from sklearn.base import clone

from core.hdf5 import create_dataset
from core.records import atomic_path
from features.store import StoreReader
from neural.pseudo import PSEUDO_DIR, Teacher, pseudo_path, pseudo_record, teacher_proba
from neural.checkpoint import fold_paths, fold_saved
from neural.unlabelled import open_unlabelled, unlabelled_path
from stacking.rundir import RunDirError
from stacking.signals import build_input

FITTED_ON = "the OOF rows of the folds other than k"


def check_teach(run, split):
    """Before anything is fitted: SPLIT's store must be in the run's cache (not the labelled split) and every
    fold model of the stacked base models saved; refused naming the file."""
    unlabelled_path(run.config["cache_dir"], split)
    for model in run.models:
        for k in range(run.n_folds):
            if not fold_saved(Path(run.run_dir) / model, k):
                missing = next(p for p in fold_paths(Path(run.run_dir) / model, k) if not p.exists())
                raise RunDirError(f"{missing}: the fold {k} model of '{model}' is missing; --teach needs every "
                                  "fold model of the stacked base models")


def fold_stacker(stacker, X, y, fold, k):
    """Fold k's stacker: a clone of the unfitted `stacker` fitted on the rows of the other folds only
    (X: StackInput, y, fold (N,))."""
    train = fold != k
    return clone(stacker).fit(X.take(train), y[train])


def fold_probas(run, k, reader, device):
    """{model: (N_unlab, C) float32} the base models' fold-k softmax on the open unlabelled store."""
    out = {}
    for model in run.models:
        one = Teacher(run.run_dir, "run", run.run_dir, [model], run.config)
        out[model] = np.concatenate([p for _, p in teacher_proba(one, k, reader, device)])
    return out


def clear_pseudo(out_dir):
    """Delete a stack's earlier teacher files (a refitted stack's would be stale); only files it writes."""
    folder = Path(out_dir) / PSEUDO_DIR
    for path in [*folder.glob("fold*.h5"), *folder.glob("fold*.h5.tmp")]:
        path.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def teach(run, X, signal_names, stacker, kind, split, out_dir, threads=1):
    """Write STACK_DIR/pseudo/fold<k>.h5 for every fold: stacker kind `kind` (a clone of `stacker`) fitted per fold
    on the labelled StackInput X (N rows, run.fold) and applied to SPLIT of the run's cache.
    -> summary for metrics.json (split, rows, files, per fold: mean max-probability, classes predicted)."""
    out_dir = Path(out_dir).resolve()
    with StoreReader(Path(run.store_path)) as labelled:
        unlabelled = open_unlabelled(run.config["cache_dir"], split, labelled)
    if unlabelled is None:
        raise RunDirError(f"{run.config['cache_dir']}: no store for the --teach split '{split}'")
    teacher = Teacher(out_dir, "stack", Path(run.run_dir).resolve(), list(run.models), run.config, stacked=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    before, summary = torch.get_num_threads(), {"split": split, "rows": unlabelled.n_videos, "folds": []}
    torch.set_num_threads(max(1, threads))
    try:
        with StoreReader(unlabelled.path) as reader:
            rows = np.arange(len(reader))
            for k in range(run.n_folds):
                fitted = fold_stacker(stacker, X, run.label, run.fold, k)
                X_unlab = build_input(run.models, fold_probas(run, k, reader, device), reader, rows, signal_names)
                proba = fitted.predict_proba(X_unlab)                        # (N_unlab, C)
                record = {**pseudo_record(teacher, k, unlabelled),
                          "stacker": {"kind": kind, "fitted_on": FITTED_ON, "n_rows": int((run.fold != k).sum()),
                                      "run_fingerprint": run.fingerprint}}
                write_pseudo(pseudo_path(out_dir, k), proba, record)
                summary["folds"].append({"fold": k, "mean_max_proba": float(proba.max(1).mean()),
                                         "classes_predicted": int(len(np.unique(proba.argmax(1))))})
    finally:
        torch.set_num_threads(before)
    summary["files"] = f"{PSEUDO_DIR}/fold<k>.h5"
    return summary


def write_pseudo(path, proba, record):
    """proba (N, C) as float16 and its record, written to a .tmp and renamed (a file under the name is whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            create_dataset(h5, "proba", proba.shape, "f2")
            h5["proba"][:] = proba.astype(np.float16)
            h5.attrs["record"] = json.dumps(record, sort_keys=True)
