"""Stratified folds over the labelled split, drawn once per run and shared by every model and the stacker.

Classes with at least `n_folds` members go through sklearn's StratifiedKFold(shuffle=True,
random_state=seed). Rarer classes (StratifiedKFold would only warn and place them unevenly) have
their items shuffled and dealt round-robin to folds, starting from a fold drawn with the seed, so
each such item lands in a different fold. Consequence, by design: a class with m < n_folds items
is held out in m folds only, and a class with a single item is absent from the training data of the
only fold model that predicts it, so its out-of-fold prediction cannot be that class. No class is
dropped: every labelled item is in exactly one fold.

With groups (`train-neural --groups FILE`, a CSV `id,group`: several clips of one uploader or actor,
near-duplicate re-uploads) the folds are sklearn's StratifiedGroupKFold(shuffle=True, random_state=seed):
no group is split across folds, so out-of-fold scores (and the stacker fitted on them) measure unseen
groups. `--groups auto` (the default) finds near-duplicate groups in the cached features
(neural/neardup.py) and uses them the same way when the data has enough of them. Stratification is as close as whole groups allow; a class whose groups are fewer than n_folds is
absent from the training data of the folds that hold all of it out, and is then never predicted there.
"""
import csv
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold


class GroupsError(ValueError):
    """A --groups file that cannot be used (a labelled id without a group)."""


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


def rare_classes_warning(labels, n_folds, class_ids, where, shown=10):
    """One warning line naming the classes with fewer labelled videos than folds, and what the folds do with
    them (the module docstring); None when there are none. labels (N,) int index into class_ids."""
    classes, counts = np.unique(labels, return_counts=True)
    rare = [(class_ids[c], n) for c, n in zip(classes, counts) if n < n_folds]
    if not rare:
        return None
    named = ", ".join(f"{c!r} ({n})" for c, n in rare[:shown]) + (f" and {len(rare) - shown} more" if len(rare) > shown else "")
    return (f"WARNING: {where}: {len(rare)} classes have fewer labelled videos than the {n_folds} folds: {named}; "
            "each of their videos is held out in a fold of its own, so those folds' models train without it, "
            "and a class of one video is never predicted out-of-fold (its out-of-fold F1 is 0)")


def make_group_folds(labels, groups, n_folds, seed):
    """labels (N,) int, groups (N,) str -> fold (N,) int8 in [0, n_folds); no group in two folds."""
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise GroupsError(f"{n_groups} groups cannot fill {n_folds} folds; use --folds {n_groups} or fewer")
    fold = np.full(len(labels), -1, np.int8)
    sgkf = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(sgkf.split(np.zeros(len(labels)), np.asarray(labels), np.asarray(groups))):
        fold[held] = k
    return fold


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_groups(path, ids):
    """(groups (N,) str aligned with ids, sha256 of the file) from a CSV `id,group` (a header line allowed).
    Every id must have a group; ids of the file not in `ids` are ignored but counted in the error."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and rows[0][:2] == ["id", "group"]:
        rows = rows[1:]
    bad = next((i for i, r in enumerate(rows) if len(r) < 2), None)
    if bad is not None:
        raise GroupsError(f"{path}: line {bad + 1}: expected 'id,group', got {rows[bad]!r}")
    group_of = {r[0].strip(): r[1].strip() for r in rows}
    missing = [v for v in ids if str(v) not in group_of]
    if missing:
        unknown = len(set(group_of) - {str(v) for v in ids})
        raise GroupsError(f"{path}: {len(missing)} of {len(ids)} labelled ids have no group, the first "
                          f"{str(missing[0])!r}" + (f" ({unknown} other ids in the file, ignored)" if unknown else ""))
    return np.array([group_of[str(v)] for v in ids], dtype=object), file_sha256(path)


def save_folds(path, ids, fold, n_folds, seed, groups_sha256="", auto=None, group=None):
    """groups_sha256: the --groups file the folds were drawn with ("" = not grouped); auto: the record of
    --groups auto (neural/neardup.py), with group (N,) the near-duplicate group of each id when it was used."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("fold", data=np.asarray(fold, np.int8))
        h5.attrs["n_folds"] = n_folds
        h5.attrs["seed"] = seed
        if groups_sha256:
            h5.attrs["grouped"] = True
            h5.attrs["groups_sha256"] = groups_sha256
        if auto is not None:
            h5.attrs["grouped"] = bool(auto["used"])
            h5.attrs["groups_auto"] = json.dumps(auto)
            if group is not None:
                h5.create_dataset("group", data=np.asarray(group, np.int64))
    os.replace(tmp, path)


def folds_groups_sha256(path):
    """The sha256 of the groups file folds.h5 was drawn with, "" when its folds are not grouped."""
    with h5py.File(path, "r") as h5:
        return str(h5.attrs.get("groups_sha256", ""))


def folds_groups_auto(path):
    """The --groups auto record folds.h5 was drawn with (neural/neardup.py), None when it was not."""
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs["groups_auto"]) if "groups_auto" in h5.attrs else None


def load_folds(path):
    """-> (ids (N,) str, fold (N,) int8, n_folds, seed)."""
    with h5py.File(path, "r") as h5:
        ids = h5["ids"].asstr()[:]
        return ids, h5["fold"][:], int(h5.attrs["n_folds"]), int(h5.attrs["seed"])
