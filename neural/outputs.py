"""RUN_DIR/<model>/predictions.h5: out-of-fold rows written fold by fold, other splits at the end.

Crash safety as in the feature store: every dataset is allocated in full when the file is made
(written to a .tmp and renamed), later writes touch only data, and a fold's `fold_done` flag is
written and flushed only after its rows. Layout (the "Neural run directory" contract):

    ids (N_lab,) str, label_fine (N_lab,) int32, oof_proba (N_lab, C) float32, fold_done (K,) bool,
    proba/<split> (N_split, C) float32, ids_<split> (N_split,) str;
    attrs: complete (bool), metrics (JSON), options (JSON)
"""
import json
import os
from pathlib import Path

import h5py
import numpy as np

from features.store import create_dataset


class RunError(RuntimeError):
    """A run directory that cannot be resumed as asked."""


def _strings(values):
    return np.array(list(values), dtype=object)


def create_predictions(path, ids, label_fine, n_classes, n_folds, splits, options):
    """splits: {split name: ids (N_split,)}; options: the JSON-able dict recorded with the model."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("ids", data=_strings(ids), dtype=h5py.string_dtype())
        h5.create_dataset("label_fine", data=np.asarray(label_fine, np.int32))
        create_dataset(h5, "oof_proba", (len(ids), n_classes), "f4")
        h5.create_dataset("fold_done", data=np.zeros(n_folds, bool))
        for split, split_ids in splits.items():
            h5.create_dataset(f"ids_{split}", data=_strings(split_ids), dtype=h5py.string_dtype())
            create_dataset(h5, f"proba/{split}", (len(split_ids), n_classes), "f4")
        h5.attrs["complete"] = False
        h5.attrs["metrics"] = "{}"
        h5.attrs["options"] = json.dumps(options, sort_keys=True)
    os.replace(tmp, path)


def open_predictions(path, ids, n_folds, splits, options):
    """Open an existing predictions file for resuming, refusing one made by another configuration."""
    with h5py.File(path, "r") as h5:
        stored = json.loads(h5.attrs["options"])
        same_ids = len(h5["ids"]) == len(ids) and all(
            a == b for a, b in zip(h5["ids"].asstr()[:], ids))
        same_splits = {k[len("ids_"):] for k in h5 if k.startswith("ids_")} == set(splits)
        same_folds = len(h5["fold_done"]) == n_folds
    if stored != options:
        diff = "; ".join(f"{k}: {stored.get(k)!r} -> {options.get(k)!r}"
                         for k in sorted(set(stored) | set(options)) if stored.get(k) != options.get(k))
        raise RunError(f"{path} was trained with other options ({diff}); use another --out or --overwrite")
    if not (same_ids and same_splits and same_folds):
        raise RunError(f"{path} was made for other labelled ids, splits or folds; "
                       "use another --out or --overwrite")


def fold_done(path):
    with h5py.File(path, "r") as h5:
        return h5["fold_done"][:], bool(h5.attrs["complete"])


def write_fold(path, k, positions, proba):
    """Store the out-of-fold rows `positions` (sorted, into ids) of fold k, then mark the fold done."""
    with h5py.File(path, "r+") as h5:
        h5["oof_proba"][positions] = proba.astype(np.float32)
        h5.flush()
        h5["fold_done"][k] = True
        h5.flush()


def read_oof(path):
    """-> (oof_proba (N_lab, C), label_fine (N_lab,))."""
    with h5py.File(path, "r") as h5:
        return h5["oof_proba"][:], h5["label_fine"][:]


def write_split_rows(h5, split, rows, proba):
    """Rows (sorted) of another split's fold-averaged probabilities, into an open file."""
    index = slice(int(rows[0]), int(rows[-1]) + 1) if rows[-1] - rows[0] + 1 == len(rows) else rows
    h5[f"proba/{split}"][index] = proba.astype(np.float32)


def finish(path, metrics):
    """Record the metrics and mark the model complete (after every proba/<split> row is written)."""
    with h5py.File(path, "r+") as h5:
        h5.attrs["metrics"] = json.dumps(metrics, sort_keys=True)
        h5.flush()
        h5.attrs["complete"] = True


def read_metrics(path):
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs["metrics"])
