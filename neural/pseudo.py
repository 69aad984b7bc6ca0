"""Pseudo-label distillation from the unlabelled split, out-of-fold honest.

A teacher (`--teacher PATH`) is a finished train-neural RUN_DIR (its base models) or a STACK_DIR of
`python run.py stack` (the run and the base models it stacked). The stack's final stacker is never applied:
it was fitted on every fold's labels, so its output on an unlabelled near-duplicate of a fold-k video would
carry that video's label into fold k's student. What is applied per fold is the base models' fold models:

    pseudo-labels of fold k = mean over the teacher's models of their fold-k model's softmax

or, when the STACK_DIR was made with `stack --teach SPLIT` (its stack.json options say so), its per-fold
stackers' (stacking/teach.py: fold k's stacker fitted on the other folds' OOF rows only, applied to the base
models' fold-k probabilities), which this module copies from STACK_DIR/pseudo/fold<k>.h5 after checking
that they were made from this unlabelled store and the teacher run's current fold models.

Fold k's teacher models never saw fold k's labelled rows (they predicted them out-of-fold), so the student
of fold k learns nothing from them about its own held-out rows, whatever the unlabelled split holds. That
needs the teacher's folds to be the student's (same labelled ids, n_folds, seed): check_teacher refuses
otherwise, naming the difference. A student run shares its folds, so it is itself a valid teacher (round 2).

    RUN_DIR/pseudo/fold<k>.h5   proba (N_unlab, C) float16: the teacher's fold-k probabilities;
                                attr record (JSON): format, fold, teacher (path, kind, run_dir, models),
                                teacher_fold_sha256 (its fold-k tensors), unlabelled (split, store, digest)
Each file is written to a .tmp and renamed, so one under the real name is whole; a rerun reuses it when its
record matches and refuses it (naming the field) when the teacher or the unlabelled store changed.

Cost: one pass of every teacher fold-k model over the unlabelled split per fold, then per training step one
extra unlabelled batch (pseudo_ratio * batch_size rows) through the student.
"""
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from core.hdf5 import create_dataset
from core.records import atomic_path, options_diff, read_json
from features.store import StoreReader
from neural.checkpoint import fold_paths, fold_saved, load_fold
from neural.data import StoreBatches
from neural.folds import load_folds
from neural.models import model_inputs
from neural.options import NeuralOptions
from neural.outputs import RUN_FILE, RunError, read_run
from neural.train import predict_rows

PSEUDO_DIR = "pseudo"
FORMAT = "shortvideo-pseudo"
BLOCK_ROWS = 8192               # unlabelled rows predicted (and held in memory) at a time
SAMPLING_STREAM = 7             # keeps the pseudo-batch draws apart from every other seeded stream
STACKED_LABELS = "per-fold stackers"    # Teacher.record()'s "labels" of a `stack --teach` teacher


@dataclass
class Teacher:
    path: Path                  # as given (resolved): a RUN_DIR or a STACK_DIR
    kind: str                   # "run" or "stack"
    run_dir: Path               # the train-neural run whose fold models pseudo-label
    models: list
    run: dict                   # its run.json
    stacked: bool = False       # a STACK_DIR of `stack --teach`: its per-fold stackers' labels, not the base models'

    def record(self):
        record = {"path": str(self.path), "kind": self.kind, "run_dir": str(self.run_dir), "models": list(self.models)}
        return {**record, "labels": STACKED_LABELS} if self.stacked else record


def resolve_teacher(path):
    """The Teacher at `path`: a STACK_DIR (stack.json names the run and its models; stacked when its options
    name a --teach split) or a RUN_DIR (every model of run.json). Every fold model must be saved."""
    path = Path(path).resolve()
    if (path / "stack.json").exists():
        stack = read_json(path / "stack.json", RunError)
        for name, kind in (("run_dir", str), ("models", list)):
            if not isinstance(stack.get(name), kind):
                raise RunError(f"{path / 'stack.json'}: field '{name}' is missing or not a {kind.__name__}")
        kind, run_dir, models = "stack", Path(stack["run_dir"]).resolve(), stack["models"]
        stacked = bool((stack.get("options") or {}).get("teach"))
    elif (path / RUN_FILE).exists():
        kind, run_dir, models, stacked = "run", path, None, False
    else:
        raise RunError(f"{path}: not a teacher: neither a train-neural run directory (run.json) nor a stack "
                       "directory (stack.json)")
    run = read_run(run_dir)
    models = list(models or run["models"])
    for model in models:
        for k in range(run["n_folds"]):
            if not fold_saved(run_dir / model, k):
                raise RunError(f"{fold_paths(run_dir / model, k)[1]}: the teacher's fold {k} model of '{model}' "
                               "is missing; finish the teacher run first")
    return Teacher(path, kind, run_dir, models, run, stacked)


def check_teacher(teacher, run_dir, ids, fold, options, reader):
    """Refuse a teacher whose folds (ids, n_folds, seed, fold of each id), classes or labelled store are not
    this run's, or that is this run itself, naming the difference."""
    if teacher.run_dir == Path(run_dir).resolve():
        raise RunError(f"{teacher.path}: a run cannot be its own teacher; give a finished run or stack")
    path = teacher.run_dir / "folds.h5"
    t_ids, t_fold, t_n_folds, t_seed = load_folds(path)
    diffs = [f"{name} {a} (teacher) vs {b} (this run)" for name, a, b in
             (("n_folds", t_n_folds, options.n_folds), ("seed", t_seed, options.seed)) if a != b]
    if len(t_ids) != len(ids):
        diffs.append(f"{len(t_ids)} labelled videos (teacher) vs {len(ids)} (this run)")
    elif not np.array_equal(t_ids, ids):
        diffs.append(f"ids: {int((t_ids != ids).sum())} of {len(ids)} labelled ids differ")
    elif not diffs and not np.array_equal(t_fold, fold):
        diffs.append(f"fold: {int((t_fold != fold).sum())} videos are in another fold")
    if diffs:
        raise RunError(f"{path}: the teacher's folds are not this run's ({'; '.join(diffs)}); the student of "
                       "fold k may only learn from the teacher's fold-k models, so train the teacher on the same "
                       "labelled store with the same --folds, --seed and --groups")
    if teacher.run["fine_classes"] != reader.fine_classes:
        raise RunError(f"{teacher.run_dir / RUN_FILE}: field 'fine_classes' differs from {reader.path}'s "
                       f"({len(teacher.run['fine_classes'])} vs {len(reader.fine_classes)} classes)")
    diff = options_diff(teacher.run["store_config"], reader.config)
    if diff:
        raise RunError(f"{teacher.run_dir / RUN_FILE}: field 'store_config': the teacher was trained on another "
                       f"labelled store than {reader.path} ({diff})")


def pseudo_path(run_dir, k):
    return Path(run_dir) / PSEUDO_DIR / f"fold{k}.h5"


def fold_sha256(teacher, k):
    """sha256 of the teacher's fold-k tensors, every model in order: which fold models made the labels."""
    h = hashlib.sha256()
    for model in teacher.models:
        h.update(fold_paths(teacher.run_dir / model, k)[0].read_bytes())
    return h.hexdigest()


def pseudo_record(teacher, k, unlabelled):
    return {"format": FORMAT, "fold": k, "teacher": teacher.record(), "teacher_fold_sha256": fold_sha256(teacher, k),
            "unlabelled": unlabelled.record()}


def stacked_record(teacher, k, unlabelled):
    """The record of a `stack --teach` teacher's fold-k file, refused (naming the file and field) when it is
    missing, made for other fold models of the teacher run, or made from another unlabelled store."""
    path = pseudo_path(teacher.path, k)
    if not path.exists():
        raise RunError(f"{path}: missing, though {teacher.path / 'stack.json'} records --teach; the stack's "
                       "teaching did not finish: run `stack --teach SPLIT` again")
    record = read_pseudo_record(path)
    expected = {"format": FORMAT, "fold": k, "teacher": teacher.record(), "teacher_fold_sha256": fold_sha256(teacher, k)}
    diff = options_diff({key: record.get(key) for key in expected}, expected)
    if diff:
        raise RunError(f"{path}: not made by this stack from the teacher run's current fold models ({diff}); "
                       "run `stack --teach SPLIT` again")
    made = record.get("unlabelled") or {}
    if made.get("digest") != unlabelled.digest:
        raise RunError(f"{path}: field 'unlabelled': made from split '{made.get('split')}' ({made.get('store')}), "
                       f"not from {unlabelled.path}; give train-neural --unlabeled {made.get('split')} or run "
                       f"`stack --teach {unlabelled.split}`")
    return record


def read_pseudo_record(path):
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs["record"])


def teacher_proba(teacher, k, reader, device):
    """Yield (first row, proba (B, C) float32) blocks of the unlabelled store: the mean of the teacher's fold-k
    models' softmax, BLOCK_ROWS rows at a time (memory stays flat whatever the split's size)."""
    batch_size = NeuralOptions.from_dict(teacher.run["options"]).batch_size
    nets = []
    for model in teacher.models:
        net, spec, _ = load_fold(teacher.run_dir / model, k, device)
        names = model_inputs(spec.model, reader, spec.aggregates)
        nets.append((net, StoreBatches(reader, names, max_tokens=spec.max_tokens)))
    for start in range(0, len(reader), BLOCK_ROWS):
        rows = np.arange(start, min(start + BLOCK_ROWS, len(reader)))
        yield start, sum(predict_rows([net], data, rows, batch_size, device) for net, data in nets) / len(nets)


def make_pseudo_labels(run_dir, teacher, unlabelled, folds, device):
    """RUN_DIR/pseudo/fold<k>.h5 for each fold in `folds`: reused when whole and made by this teacher from
    this unlabelled store, refused when made by another, else written (atomically): predicted by the
    teacher's fold-k models, or copied from a `stack --teach` teacher's own fold-k file."""
    for k in folds:
        path = pseudo_path(run_dir, k)
        record = stacked_record(teacher, k, unlabelled) if teacher.stacked else pseudo_record(teacher, k, unlabelled)
        if path.exists():
            diff = options_diff(read_pseudo_record(path), record)
            if diff:
                raise RunError(f"{path}: made by another teacher or from another unlabelled store ({diff}); "
                               "use another --out or --overwrite")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if teacher.stacked:
            with atomic_path(path) as tmp:
                shutil.copyfile(pseudo_path(teacher.path, k), tmp)
            continue
        n_classes = len(teacher.run["fine_classes"])
        with StoreReader(unlabelled.path) as reader, atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as h5:
                create_dataset(h5, "proba", (len(reader), n_classes), "f2")
                for start, proba in teacher_proba(teacher, k, reader, device):
                    h5["proba"][start:start + len(proba)] = proba.astype(np.float16)
                h5.attrs["record"] = json.dumps(record, sort_keys=True)


def read_blocks(path):
    """Yield (first row, proba (B, C) float32) blocks of a pseudo-label file."""
    with h5py.File(path, "r") as h5:
        proba = h5["proba"]
        for start in range(0, len(proba), BLOCK_ROWS):
            yield start, proba[start:start + BLOCK_ROWS].astype(np.float32)


def pseudo_argmax(run_dir, n_folds):
    """For scoring pseudo-labels against answers kept aside (a bench): (unlabelled ids (N,), {fold k:
    (argmax (N,) int64, max probability (N,) float32)}) of the teacher's fold-k pseudo-labels."""
    out, ids = {}, None
    for k in range(n_folds):
        path = pseudo_path(run_dir, k)
        if ids is None:
            with StoreReader(read_pseudo_record(path)["unlabelled"]["store"]) as reader:
                ids = reader.ids
        blocks = [p for _, p in read_blocks(path)]
        proba = np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)
        out[k] = (proba.argmax(1), proba.max(1))
    return ids, out


class SoftTargets(Dataset):
    """dataset[rows] -> a StoreBatches batch of unlabelled rows (repeats allowed) plus "soft_target" (B, C)
    float32, those rows' teacher probabilities read from the pseudo-label file (each process opens its own
    handle, so nothing large is held in memory or pickled to DataLoader workers)."""

    def __init__(self, batches, path):
        self.batches, self.path = batches, Path(path)
        self._h5, self._pid = None, None

    def __getstate__(self):
        return dict(self.__dict__, _h5=None, _pid=None)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, rows):
        unique, inverse = np.unique(np.asarray(rows), return_inverse=True)    # StoreBatches wants no repeats
        inverse = torch.from_numpy(inverse.reshape(-1))
        out = {name: value[inverse] for name, value in self.batches[unique].items()}
        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
        out["soft_target"] = torch.from_numpy(self._h5["proba"][unique].astype(np.float32))[inverse]
        return out


class PseudoLabels:
    """Fold k's pseudo-labels for one student model: the unlabelled rows whose teacher max-probability is at
    least options.pseudo_threshold, their teacher classes (argmax), and class-balanced batches of them with
    their soft targets (`dataset`)."""

    def __init__(self, path, reader, names, options):
        rows, classes = [], []
        for start, proba in read_blocks(path):
            keep = np.flatnonzero(proba.max(1) >= options.pseudo_threshold)
            rows.append(start + keep)
            classes.append(proba[keep].argmax(1))
        self.path, self.options = Path(path), options
        self.rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)            # (M,) sorted
        self.classes = np.concatenate(classes) if classes else np.zeros(0, np.int64)   # (M,)
        self.dataset = SoftTargets(StoreBatches(reader, names, max_tokens=options.max_tokens), path)

    def __len__(self):
        return len(self.rows)

    def batches(self, seed, epoch, n_steps):
        """n_steps batches of pseudo_ratio * batch_size rows, drawn with replacement so that every teacher
        class (argmax) is equally likely: the long tail is not swamped by the head. Seeded by (seed, epoch)."""
        size = max(1, round(self.options.pseudo_ratio * self.options.batch_size))
        counts = np.bincount(self.classes)
        p = 1.0 / counts[self.classes]
        rng = np.random.default_rng([seed, epoch, SAMPLING_STREAM])
        picks = self.rows[rng.choice(len(self.rows), size=n_steps * size, p=p / p.sum())]
        return [picks[i * size:(i + 1) * size] for i in range(n_steps)]

    def info(self):
        return {"file": str(self.path), "rows": int(len(self.rows)),
                "rows_per_class": np.bincount(self.classes).tolist()}
