"""RUN_DIR/run.json (read_run, write_run) and RUN_DIR/<model>/predictions.h5: out-of-fold rows
written fold by fold, other splits at the end.

Only one process writes a predictions.h5. Under torchrun a fold fitted by a rank other than the main
one leaves its rows in RUN_DIR/<model>/oof_fold<k>.h5 (positions (n,) int64, oof_proba (n, C) float32,
attr fold; written atomically), which the model's owner merges with write_fold and then deletes.

Crash safety as in the feature store: every dataset is allocated in full when the file is made
(written to a .tmp and renamed), later writes touch only data, and a fold's `fold_done` flag is
written and flushed only after its rows.

oof_proba and proba/<split> are chunked one row per chunk, and one HDF5 read or write spanning many chunks
costs ~5-7 KB of memory per chunk it touches (HDF5's per-chunk selection state; 221 MiB to read a 30k x
200 oof_proba whole, whose data is 23 MiB), so every read or write of them here goes ROW_BLOCK rows at a time.
Layout (the "Neural run directory" contract):

    ids (N_lab,) str, label_fine (N_lab,) int32, oof_proba (N_lab, C) float32, fold_done (K,) bool,
    proba/<split> (N_split, C) float32, ids_<split> (N_split,) str;
    attrs: complete (bool), metrics (JSON), options (JSON)
"""
import json
import os
from pathlib import Path

import h5py
import numpy as np

from core import schema
from core.hdf5 import create_dataset
from core.owned import OwnedFiles
from core.records import atomic_path, options_diff, read_json, write_json
from neural.options import NeuralOptions, OptionsError

RUN_FILE = "run.json"
# every file train-neural writes under RUN_DIR (notes/CONTRACTS.md); --overwrite deletes these and nothing else
RUN_DIR_FILES = OwnedFiles([RUN_FILE, "folds.h5", "*/predictions.h5", "*/fold[0-9]*.safetensors", "*/fold[0-9]*.json",
                            "*/oof_fold[0-9]*.h5", "pseudo/fold[0-9]*.h5", "pretrain/*.safetensors", "pretrain/*.json"])
ROW_BLOCK = 1024               # rows per HDF5 read or write of a (N, C) dataset: bounds its per-chunk memory
# run.json fields -> their JSON type; read_run refuses a file lacking one or holding another type
RUN_FIELDS = {"cache_dir": str, "store_config": dict, "fine_classes": list, "coarse_classes": list,
              "fine_to_coarse": list, "options": dict, "seed": int, "n_folds": int, "models": list}


class RunError(RuntimeError):
    """A run directory that cannot be read or resumed as asked."""


def read_run(run_dir):
    """RUN_DIR/run.json as a dict, its fields checked; a missing file or a missing or mistyped field raises
    RunError naming the file and the field."""
    path = Path(run_dir) / RUN_FILE
    run = read_json(path, RunError, "not a train-neural run directory; run `python run.py train-neural` first")
    if not isinstance(run, dict):
        raise RunError(f"{path}: expected a JSON object, found {type(run).__name__}")
    for name, kind in RUN_FIELDS.items():
        if name not in run:
            raise RunError(f"{path}: field '{name}' is missing")
        if not isinstance(run[name], kind) or (kind is int and isinstance(run[name], bool)):
            raise RunError(f"{path}: field '{name}' should be a {kind.__name__}, found {run[name]!r:.60}")
    if len(run["fine_to_coarse"]) != len(run["fine_classes"]):
        raise RunError(f"{path}: field 'fine_to_coarse' has {len(run['fine_to_coarse'])} entries for "
                       f"{len(run['fine_classes'])} fine classes")
    _result_options(path, run["options"])
    if run["n_folds"] < 2:
        raise RunError(f"{path}: field 'n_folds' is {run['n_folds']}, at least 2 expected")
    return run


def labelled_store_path(run):
    """The labelled store a run (read_run's dict) was trained on: CACHE_DIR/<LABELLED_SPLIT>.h5."""
    return schema.store_path(run["cache_dir"], schema.LABELLED_SPLIT)


def _result_options(path, values):
    try:
        return NeuralOptions.from_dict(values).result_dict()
    except OptionsError as err:
        raise RunError(f"{path}: field 'options': {err}") from err


def write_run(run_dir, run, result_options):
    """Write RUN_DIR/run.json, or on a resumed run check it against the one there first: another store
    (its config), other classes or other options (`result_options`, what changes the predictions) are
    refused naming each difference; the model list grows. -> the run dict written."""
    path = Path(run_dir) / RUN_FILE
    if path.exists():
        old = read_run(run_dir)
        same = {"store_config": old["store_config"], "fine_classes": old["fine_classes"],
                "options": _result_options(path, old["options"])}
        new = {"store_config": run["store_config"], "fine_classes": run["fine_classes"],
               "options": result_options}
        diff = options_diff(same, new)
        if diff:
            raise RunError(f"{path}: this run was made from another store or with other options ({diff}); "
                           "use another --out or --overwrite")
        run = dict(run, models=list(dict.fromkeys(old["models"] + list(run["models"]))))
    write_json(path, run, indent=1, sort_keys=True)
    return run


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
    write_fold_batches(path, k, [(positions, proba)])


def write_fold_batches(path, k, batches):
    """Store fold k's out-of-fold rows as they come, then mark the fold done. batches: iterable of
    (positions (B,) sorted, into ids; proba (B, C)), e.g. straight from prediction, so the fold's rows
    are never held whole."""
    with h5py.File(path, "r+") as h5:
        for positions, proba in batches:
            _write_rows(h5["oof_proba"], positions, proba)
        h5.flush()
        h5["fold_done"][k] = True
        h5.flush()


def _write_rows(dataset, positions, proba):
    """dataset[positions] = proba (float32), ROW_BLOCK rows per HDF5 write."""
    positions = np.asarray(positions)
    for start in range(0, len(positions), ROW_BLOCK):
        part = positions[start:start + ROW_BLOCK]
        dataset[_index(part)] = np.asarray(proba[start:start + ROW_BLOCK], np.float32)


def _index(rows):
    """A slice when the sorted `rows` are contiguous (one hyperslab), else the rows themselves."""
    return slice(int(rows[0]), int(rows[-1]) + 1) if rows[-1] - rows[0] + 1 == len(rows) else rows


def fold_rows_path(model_dir, k):
    return Path(model_dir) / f"oof_fold{k}.h5"


def write_fold_rows(path, k, positions, proba):
    """Fold k's out-of-fold rows (positions (n,) sorted into ids, proba (n, C)) in a file of their own."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("positions", data=np.asarray(positions, np.int64))
            h5.create_dataset("oof_proba", data=np.asarray(proba, np.float32))
            h5.attrs["fold"] = k


def read_fold_rows(path, k, positions, n_classes):
    """The oof_proba (n, C) of a per-fold rows file, refused (naming the file and the field) unless it
    holds fold k's rows exactly: `positions` (n,) is what the run's folds.h5 holds out in fold k."""
    with h5py.File(path, "r") as h5:
        fold, stored = int(h5.attrs.get("fold", -1)), h5["positions"][:]
        proba = h5["oof_proba"][:]
    if fold != k:
        raise RunError(f"{path}: attribute 'fold' is {fold}, expected {k}; delete the file and rerun")
    if not np.array_equal(stored, positions):
        raise RunError(f"{path}: field 'positions' is not fold {k}'s held-out rows in folds.h5 "
                       f"({len(stored)} rows, {len(positions)} expected); delete the file and rerun")
    if proba.shape != (len(positions), n_classes):
        raise RunError(f"{path}: field 'oof_proba' has shape {proba.shape}, expected {(len(positions), n_classes)}")
    return proba


def read_oof(path):
    """-> (oof_proba (N_lab, C), label_fine (N_lab,)), read ROW_BLOCK rows at a time."""
    with h5py.File(path, "r") as h5:
        return read_blocked(h5["oof_proba"]), h5["label_fine"][:]


def read_blocked(dataset, dtype=np.float32):
    """A whole (N, C) dataset (oof_proba, proba/<split>) as `dtype`, ROW_BLOCK rows per HDF5 read."""
    out = np.empty(dataset.shape, dtype)                                    # (N, C)
    for start, block in _row_blocks(dataset):
        out[start:start + len(block)] = block
    return out


def read_oof_argmax(path):
    """-> (arg-max fine class of each out-of-fold row (N_lab,) int64, label_fine (N_lab,)): what the
    metrics need, without holding the (N_lab, C) probabilities."""
    with h5py.File(path, "r") as h5:
        dataset = h5["oof_proba"]
        pred = np.empty(len(dataset), np.int64)                             # (N_lab,)
        for start, block in _row_blocks(dataset):
            pred[start:start + len(block)] = block.argmax(axis=1)
        return pred, h5["label_fine"][:]


def _row_blocks(dataset):
    """Yield (start, dataset[start:start + ROW_BLOCK])."""
    for start in range(0, len(dataset), ROW_BLOCK):
        yield start, dataset[start:start + ROW_BLOCK]


def write_split_rows(h5, split, rows, proba):
    """Rows (sorted) of another split's fold-averaged probabilities, into an open file."""
    _write_rows(h5[f"proba/{split}"], rows, proba)


def finish(path, metrics):
    """Record the metrics and mark the model complete (after every proba/<split> row is written)."""
    with h5py.File(path, "r+") as h5:
        h5.attrs["metrics"] = json.dumps(metrics, sort_keys=True)
        h5.flush()
        h5.attrs["complete"] = True


def read_metrics(path):
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs["metrics"])
