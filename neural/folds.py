"""Stratified folds over the labelled split, drawn once per run and shared by every model and the stacker.

Classes with at least `n_folds` members go through sklearn's StratifiedKFold(shuffle=True,
random_state=seed). Rarer classes (StratifiedKFold would only warn and place them unevenly) have
their items shuffled and dealt round-robin to folds, starting from a fold drawn with the seed, so
each such item lands in a different fold. Consequence, by design: a class with m < n_folds items
is held out in m folds only, and a class with a single item is absent from the training data of the
only fold model that predicts it, so its out-of-fold prediction cannot be that class. No class is
dropped: every labelled item is in exactly one fold.
"""
import os
from pathlib import Path

import h5py
import numpy as np
from sklearn.model_selection import StratifiedKFold


def make_folds(labels, n_folds, seed):
    """labels (N,) int -> fold (N,) int8 in [0, n_folds)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    rare = np.isin(labels, classes[counts < n_folds])
    fold = np.full(len(labels), -1, np.int8)
    common = np.flatnonzero(~rare)
    if len(common):
        skf = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
        for k, (_, held) in enumerate(skf.split(np.zeros(len(common)), labels[common])):
            fold[common[held]] = k
    rng = np.random.default_rng(seed)
    rare_rows = rng.permutation(np.flatnonzero(rare))
    # sorting by class keeps each rare class's items in consecutive, hence distinct, folds
    rare_rows = rare_rows[np.argsort(labels[rare_rows], kind="stable")]
    start = int(rng.integers(n_folds))
    fold[rare_rows] = (start + np.arange(len(rare_rows))) % n_folds
    return fold


def save_folds(path, ids, fold, n_folds, seed):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("fold", data=np.asarray(fold, np.int8))
        h5.attrs["n_folds"] = n_folds
        h5.attrs["seed"] = seed
    os.replace(tmp, path)


def load_folds(path):
    """-> (ids (N,) str, fold (N,) int8, n_folds, seed)."""
    with h5py.File(path, "r") as h5:
        ids = h5["ids"].asstr()[:]
        return ids, h5["fold"][:], int(h5.attrs["n_folds"]), int(h5.attrs["seed"])
