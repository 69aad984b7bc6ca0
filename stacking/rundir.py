"""Read and check a neural run directory (the "Neural run directory" contract in notes/CONTRACTS.md).

Everything the stacker learns from is checked here, once, where it enters: the fold assignment, the
class set, the labels and the ids of every base model must agree with RUN_DIR/folds.h5, run.json and
the labelled store that run.json names; otherwise the stack would silently mix predictions made on
different data.
"""
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from core import schema
from core.records import options_diff
from features.store import StoreReader, rows_of
from neural.outputs import labelled_store_path, read_blocked, read_run


class RunDirError(ValueError):
    """A run directory that cannot be stacked as asked."""


@dataclass
class RunData:
    run_dir: Path
    config: dict                     # run.json
    models: list                     # base model names, in stacking order
    ids: np.ndarray                  # (N,) str labelled video ids, folds.h5 order
    label: np.ndarray                # (N,) int64 fine class index
    fold: np.ndarray                 # (N,) int64
    oof: dict                        # {model: (N, C) float32 out-of-fold proba}
    fine_classes: list               # (C,) category ids
    coarse_classes: list
    fine_to_coarse: np.ndarray       # (C,)
    store_path: Path                 # the labelled store run.json names
    store_config: dict
    fingerprint: str = field(default="")

    @property
    def n_classes(self):
        return len(self.fine_classes)

    @property
    def n_folds(self):
        return int(self.fold.max()) + 1


def read_folds(run_dir):
    """(ids (N,), fold (N,), attrs) from RUN_DIR/folds.h5."""
    path = Path(run_dir) / "folds.h5"
    if not path.exists():
        raise RunDirError(f"{path}: missing; RUN_DIR must come from `python run.py train-neural`")
    with h5py.File(path, "r") as h5:
        for name in ("ids", "fold"):
            if name not in h5:
                raise RunDirError(f"{path}: dataset '{name}' is missing")
        ids, fold = h5["ids"].asstr()[:], h5["fold"][:].astype(np.int64)
        attrs = dict(h5.attrs)
    if len(ids) != len(fold) or len(ids) == 0:
        raise RunDirError(f"{path}: 'ids' ({len(ids)}) and 'fold' ({len(fold)}) must have the same, non-zero length")
    if len(set(ids)) != len(ids):
        raise RunDirError(f"{path}: duplicate video ids")
    if fold.min() < 0 or len(np.unique(fold)) < 2:
        raise RunDirError(f"{path}: 'fold' needs at least two folds numbered from 0, got {np.unique(fold)}")
    return ids, fold, attrs


def predictions_path(run_dir, model):
    return Path(run_dir) / model / "predictions.h5"


def _check_model(path, model, ids, n_classes):
    """Read one base model's out-of-fold predictions; returns (oof (N, C), label (N,), attrs)."""
    with h5py.File(path, "r") as h5:
        if not bool(h5.attrs.get("complete", False)):
            raise RunDirError(f"{path}: model '{model}' did not finish training (attrs complete is not True)")
        for name in ("ids", "oof_proba", "label_fine"):
            if name not in h5:
                raise RunDirError(f"{path}: model '{model}': dataset '{name}' is missing")
        model_ids = h5["ids"].asstr()[:]
        if len(model_ids) != len(ids) or (model_ids != ids).any():
            bad = _first_mismatch(model_ids, ids)
            raise RunDirError(f"{path}: model '{model}' has other labelled ids than folds.h5 ({bad}); "
                              "it was trained on a different store or fold assignment")
        oof = read_blocked(h5["oof_proba"])                # (N, C) float32
        label = h5["label_fine"][:].astype(np.int64)       # (N,)
        attrs = dict(h5.attrs)
    if oof.shape != (len(ids), n_classes):
        raise RunDirError(f"{path}: model '{model}': oof_proba has shape {oof.shape}, expected "
                          f"({len(ids)}, {n_classes}) for the {n_classes} classes of run.json")
    if not np.isfinite(oof).all():
        row = int(np.where(~np.isfinite(oof).all(axis=1))[0][0])
        raise RunDirError(f"{path}: model '{model}': oof_proba of video {ids[row]} is not finite")
    return oof, label, attrs


def _first_mismatch(a, b):
    if len(a) != len(b):
        return f"{len(a)} ids against {len(b)}"
    i = int(np.where(a != b)[0][0])
    return f"row {i}: '{a[i]}' against '{b[i]}'"


def _check_model_folds(path, model, attrs, fold, folds_attrs):
    """A model trained on another fold assignment would leak labels into the stacker's folds.

    The model records its n_folds and seed in attrs["options"] and has one fold_done flag per fold.
    """
    options = json.loads(attrs.get("options", "{}") or "{}")
    for key in ("n_folds", "seed"):
        if key in options and key in folds_attrs and int(options[key]) != int(folds_attrs[key]):
            raise RunDirError(f"{path}: model '{model}' was trained with {key}={options[key]}, but folds.h5 "
                              f"has {key}={folds_attrs[key]}: another fold assignment")
    with h5py.File(path, "r") as h5:
        n_done = len(h5["fold_done"]) if "fold_done" in h5 else None
    if n_done is not None and n_done != len(np.unique(fold)):
        raise RunDirError(f"{path}: model '{model}' has {n_done} folds, folds.h5 has {len(np.unique(fold))}")


def load_run(run_dir, models=None):
    """Read and cross-check RUN_DIR; `models` (names) defaults to all models of run.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no run directory here")
    config = read_run(run_dir)
    models = list(models) if models else list(config["models"])
    missing = [m for m in models if not predictions_path(run_dir, m).exists()]
    if missing:
        raise RunDirError(f"{run_dir}: base model(s) missing: {', '.join(missing)} "
                          f"(no <model>/predictions.h5); run.json lists {', '.join(config['models'])}")
    ids, fold, folds_attrs = read_folds(run_dir)
    fine_classes = [str(c) for c in config["fine_classes"]]
    oof, label = {}, None
    for model in models:
        path = predictions_path(run_dir, model)
        oof[model], model_label, attrs = _check_model(path, model, ids, len(fine_classes))
        _check_model_folds(path, model, attrs, fold, folds_attrs)
        if label is None:
            label = model_label
        elif (model_label != label).any():
            raise RunDirError(f"{path}: model '{model}' has other labels than '{models[0]}'")
    if label.min() < 0 or label.max() >= len(fine_classes):
        row = int(np.where((label < 0) | (label >= len(fine_classes)))[0][0])
        raise RunDirError(f"{predictions_path(run_dir, models[0])}: label_fine of video {ids[row]} is "
                          f"{label[row]}, outside 0..{len(fine_classes) - 1}")
    if len(np.unique(label)) < 2:
        raise RunDirError(f"{predictions_path(run_dir, models[0])}: the labelled videos hold one class "
                          f"({fine_classes[label[0]]!r}); stacking needs at least two classes")
    store_path, store_config = check_store(config, ids, label, fine_classes)
    run = RunData(run_dir, config, models, ids, label, fold, oof, fine_classes,
                  [str(c) for c in config.get("coarse_classes", [])],
                  np.asarray(config["fine_to_coarse"], np.int64), store_path, store_config)
    run.fingerprint = fingerprint(ids, fold, fine_classes, store_config)
    return run


def check_store(config, ids, label, fine_classes):
    """The labelled store run.json names must be the one the models were trained on."""
    path = labelled_store_path(config)
    with StoreReader(path) as reader:
        if reader.fine_classes != fine_classes:
            raise RunDirError(f"{path}: the store's fine_classes differ from run.json's; "
                              "the run was made from a different store or class set")
        if reader.config != config["store_config"]:
            raise RunDirError(f"{path}: the store's config differs from the one recorded in run.json "
                              f"({options_diff(config['store_config'], reader.config)}); "
                              "the run was made from a different store (re-extracted since?)")
        store_rows = rows_of(reader.ids, ids, path)
        store_label = reader.read(schema.LABEL_FINE, slice(None))[store_rows]
        if (store_label != label).any():
            row = int(np.where(store_label != label)[0][0])
            raise RunDirError(f"{path}: video {ids[row]} has label {store_label[row]} in the store but "
                              f"{label[row]} in the run's predictions; the run was made from a different store")
        return path, reader.config


def fingerprint(ids, fold, fine_classes, store_config):
    """What a stack depends on: the labelled ids, their folds, the classes and the store's config."""
    h = hashlib.sha256()
    h.update("\n".join(ids).encode())
    h.update(np.asarray(fold, np.int64).tobytes())
    h.update("\n".join(fine_classes).encode())
    h.update(json.dumps(store_config, sort_keys=True).encode())
    return h.hexdigest()


def split_predictions(run, split):
    """(ids (N,), {model: proba (N, C)}) of another split, averaged over fold models by train-neural."""
    ids, probas = None, {}
    for model in run.models:
        path = predictions_path(run.run_dir, model)
        with h5py.File(path, "r") as h5:
            if f"proba/{split}" not in h5 or f"ids_{split}" not in h5:
                have = sorted(h5["proba"].keys()) if "proba" in h5 else []
                raise RunDirError(f"{path}: model '{model}' has no predictions for split '{split}' "
                                  f"(it has: {', '.join(have) or 'none'})")
            model_ids = h5[f"ids_{split}"].asstr()[:]
            probas[model] = read_blocked(h5[f"proba/{split}"])             # (N_split, C) float32
        if ids is None:
            ids = model_ids
        elif len(model_ids) != len(ids) or (model_ids != ids).any():
            raise RunDirError(f"{path}: model '{model}' has other ids for split '{split}' than "
                              f"'{run.models[0]}' ({_first_mismatch(model_ids, ids)})")
    return ids, probas


def available_splits(run):
    """Splits (other than the out-of-fold labelled one) every base model has predictions for."""
    common = None
    for model in run.models:
        with h5py.File(predictions_path(run.run_dir, model), "r") as h5:
            have = set(h5["proba"].keys()) if "proba" in h5 else set()
        common = have if common is None else common & have
    return sorted(common or [])
