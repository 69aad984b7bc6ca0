"""train_neural: folds once, then every model out-of-fold, resumable per model and fold.

RUN_DIR layout: the "Neural run directory" contract in notes/CONTRACTS.md (run.json, folds.h5,
<model>/predictions.h5, <model>/fold<k>.{safetensors,json}). Training uses no early stopping on the held-out fold (a
fixed number of epochs), so out-of-fold predictions are honest estimates.

Under torchrun (core/world.py) the (model, fold) fits are spread over the ranks (neural/distributed.py):
the main rank writes folds.h5 and run.json and creates each predictions.h5, every rank fits its share and
saves its fold files, a rank other than the main one leaves its out-of-fold rows in a per-fold file, and
after a barrier each model's owner rank merges those rows, predicts the other splits and writes the
metrics. The result equals a one-process run.
"""
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from core import schema
from core.device import resolve_device
from core.owned import check_apart
from core.records import options_diff
from core.world import current_world
from features.class_names import CLASS_NAMES_FILE, load_class_names
from features.codebook import CODEBOOK_FILE, Codebook
from features.store import StoreReader
from neural import outputs
from neural.checkpoint import fold_paths, fold_saved, load_fold, read_record, save_fold
from neural.data import StoreBatches
from neural.distributed import on_main, owner, rank_jobs, set_threads
from neural.folds import (GroupsError, file_sha256, folds_groups_auto, folds_groups_sha256, load_folds,
                          make_folds, make_group_folds, rare_classes_warning, read_groups, save_folds)
from neural.metrics import challenge_metric
from neural.neardup import AUTO, NONE, NearDupRule, store_groups
from neural.models import FitContext, check_params, model_entry, model_inputs, registry
from neural.options import NeuralOptions
from neural.outputs import RunError
from neural.predict import check_classes, predict_split
from neural.pretrain import load_pretrained, pretrain_models
from neural.pseudo import PseudoLabels, check_teacher, make_pseudo_labels, pseudo_path, resolve_teacher
from neural.unlabelled import DEFAULT_SPLIT, open_unlabelled, unlabelled_path
from neural.spec import spec_from_store
from neural.train import fit_fold, predict_batches, predict_rows



def cache_splits(cache_dir):
    """Every feature store in CACHE_DIR by split name, sorted (codebook.h5, class_names.h5 are not stores)."""
    found = []
    for path in sorted(Path(cache_dir).glob("*.h5")):
        with h5py.File(path, "r") as h5:
            if "schema_version" in h5.attrs:
                found.append(path.stem)
    return found


def other_splits(cache_dir, options):
    """Stores to predict beside the labelled one: those named, or every other store in CACHE_DIR."""
    if options.splits:
        return list(options.splits)
    return [s for s in cache_splits(cache_dir) if s != schema.LABELLED_SPLIT]


def pretrain_splits(cache_dir):
    """The stores pretraining reads: every one in CACHE_DIR (labels are never read), the labelled first."""
    return [schema.LABELLED_SPLIT] + [s for s in cache_splits(cache_dir) if s != schema.LABELLED_SPLIT]


def available_models(cache_dir):
    """Every model of the registry that is not optional (ENTRY.default), less one that needs class names
    when CACHE_DIR has none."""
    has_names = (Path(cache_dir) / CLASS_NAMES_FILE).exists()
    return tuple(name for name, entry in registry().items()
                 if entry.default and (has_names or not entry.needs_class_names))


def describe_models(models):
    """One line naming the models a run trains, and why `names` is not among them when it is not."""
    return f"models: {', '.join(models)}" + ("" if "names" in models else
           " (not names: the category map gave no class names, so the cache has no class_names.h5)")


def labelled_rows(reader):
    """Store rows with a known label, their ids and labels (N_lab,); unlabelled rows are left out."""
    label = reader.read(schema.LABEL_FINE, slice(None)).astype(np.int64)     # (N,) small: one int per row
    rows = np.flatnonzero(label >= 0)
    if not len(rows):
        raise RunError(f"{reader.path}: no labelled rows (label_fine is -1 everywhere)")
    classes = np.unique(label[rows])
    if len(classes) < 2:
        raise RunError(f"{reader.path}: the labelled videos hold one class ({reader.fine_classes[classes[0]]!r}, "
                       f"{len(rows)} videos); a classifier needs at least two classes")
    return rows, reader.ids[rows], label


def groups_mode(options):
    """'none', 'auto' (near-duplicate groups found in the features, neural/neardup.py) or 'file'."""
    return {"": NONE, NONE: NONE, AUTO: AUTO}.get(options.groups, "file")


def draw_folds(ids, labels, options, reader=None, rows=None):
    """-> (fold (N,), groups info: {} without groups, {"sha256"} of a groups file, {"auto": record,
    "group": (N,)} with --groups auto, which reads the features of the store rows `rows` of `reader`)."""
    mode = groups_mode(options)
    if mode == NONE:
        return make_folds(labels, options.n_folds, options.seed), {}
    if mode == AUTO:
        if reader is None:
            raise RunError("--groups auto needs the labelled store to find near-duplicates in")
        group, record = store_groups(reader, rows, NearDupRule(seed=options.seed))
        fold = (make_group_folds(labels, group.astype(str), options.n_folds, options.seed) if record["used"]
                else make_folds(labels, options.n_folds, options.seed))
        return fold, {"auto": record, "group": group if record["used"] else None}
    try:
        groups, sha256 = read_groups(options.groups, ids)
        return make_group_folds(labels, groups, options.n_folds, options.seed), {"sha256": sha256}
    except GroupsError as err:
        raise RunError(str(err)) from err


def describe_groups(source):
    return {"": "no groups", AUTO: "--groups auto"}.get(source, f"groups file sha256 {source[:12]}")


def groups_source(path):
    """How RUN_DIR/folds.h5 was grouped: a groups file's sha256, 'auto', or '' (no groups)."""
    return AUTO if folds_groups_auto(path) is not None else folds_groups_sha256(path)


def folds_to_draw(run_dir, ids, labels, options, overwrite, reader=None, rows=None):
    """(fold (N,), groups info) this run will save, when it has no folds yet or --overwrite discards
    them; None when it will reuse RUN_DIR/folds.h5. Drawn once, for the teacher's check and for saving."""
    if (Path(run_dir) / "folds.h5").exists() and not overwrite:
        return None
    return draw_folds(ids, labels, options, reader, rows)


def prepare_folds(run_dir, ids, labels, options, drawn=None):
    """Save the folds once (`drawn`, from folds_to_draw, else drawn here); on a rerun, reuse them after
    checking they belong to this data (and groups)."""
    path = Path(run_dir) / "folds.h5"
    if path.exists():
        stored_ids, fold, n_folds, seed = load_folds(path)
        if n_folds != options.n_folds or seed != options.seed or not np.array_equal(stored_ids, ids):
            raise RunError(f"{path}: folds were drawn for other ids, n_folds or seed "
                           f"({n_folds} folds, seed {seed}); use another --out or --overwrite")
        mode = groups_mode(options)
        wanted = {NONE: "", AUTO: AUTO}[mode] if mode in (NONE, AUTO) else file_sha256(options.groups)
        stored = groups_source(path)
        if stored != wanted:
            raise RunError(f"{path}: folds were drawn with {describe_groups(stored)}, this run has "
                           f"{describe_groups(wanted)} (--groups {options.groups or NONE}); "
                           "use another --out or --overwrite")
        return fold
    fold, info = drawn or draw_folds(ids, labels, options)
    save_folds(path, ids, fold, options.n_folds, options.seed, info.get("sha256", ""), info.get("auto"),
               info.get("group"))
    return fold


def write_run_json(run_dir, cache_dir, reader, models, options, pseudo=None):
    """RUN_DIR/run.json for this run; a resumed run must come from the same store (config), classes and
    options (outputs.write_run refuses otherwise, naming each difference). pseudo: (Teacher, Unlabelled),
    recorded as field 'pseudo' (which teacher and which unlabelled store the models learn from)."""
    run = {"cache_dir": str(Path(cache_dir).resolve()), "store_config": reader.config,
           "fine_classes": reader.fine_classes, "coarse_classes": reader.coarse_classes,
           "fine_to_coarse": reader.fine_to_coarse.tolist(), "options": options.to_dict(),
           "seed": options.seed, "n_folds": options.n_folds, "models": list(models)}
    if pseudo is not None:
        run["pseudo"] = {"teacher": pseudo[0].record(), "unlabelled": pseudo[1].record()}
    mode = groups_mode(options)
    if mode == "file":
        run["groups"] = {"path": options.groups, "sha256": file_sha256(options.groups)}
    elif mode == AUTO:                  # the rule, its data-chosen values and counts, as folds.h5 holds them
        run["groups"] = {"auto": folds_groups_auto(Path(run_dir) / "folds.h5")}
    return outputs.write_run(run_dir, run, options.result_dict())


@dataclass
class RunShared:
    """What every model of one train-neural run shares: where it reads and writes, the labelled store and
    its folds, the options, the device, and the teacher when the folds distil one."""
    run_dir: Path
    cache_dir: Path
    reader: StoreReader               # the labelled split's store
    split_readers: dict               # {split: StoreReader} of the splits predicted beside it
    options: NeuralOptions
    fold: np.ndarray                  # (N_lab,) fold of each labelled id
    rows: np.ndarray                  # (N_lab,) store row of each labelled id
    labels: np.ndarray                # (N,) fine label of each store row
    device: str | None = None         # None: resolve_device()
    writes_predictions: bool = True   # fold rows go into predictions.h5 (the main rank), else a per-fold file
    desc: str = ""                    # after "<model> fold k" in the progress bar (the rank)
    pseudo: tuple | None = None       # (Teacher, Unlabelled) when the folds distil pseudo-labels (neural/pseudo.py)


class ModelRun:
    """One model's folds and outputs inside RUN_DIR/<model>/."""

    def __init__(self, name, shared):
        """Model `name` of the run `shared` (RunShared)."""
        options, reader, split_readers = shared.options, shared.reader, shared.split_readers
        cache_dir = shared.cache_dir
        self.name, self.options, self.fold, self.rows = name, options, shared.fold, shared.rows
        self.writes_predictions, self.desc = shared.writes_predictions, shared.desc
        self.dir = Path(shared.run_dir) / name
        self.reader, self.split_readers = reader, split_readers
        entry = model_entry(name)
        names = model_inputs(name, reader)
        for r in split_readers.values():           # fail before training, not after
            model_inputs(name, r, [n for n in names if n.startswith(schema.AGG_GROUP + "/")])
        # the cache files that only initialise a model: loaded now, so a missing one fails before fold 0
        self.codebook = Codebook.load(Path(cache_dir) / CODEBOOK_FILE) if entry.needs_codebook else None
        self.class_names = load_class_names(cache_dir, reader.fine_classes) if entry.needs_class_names else None
        self.spec = spec_from_store(name, reader, options, names, self.codebook)
        self.dataset = StoreBatches(reader, names, shared.labels, reader.fine_to_coarse, options.max_tokens)
        self.device = shared.device or resolve_device()
        self.preds = self.dir / "predictions.h5"
        self.record = dict(options.result_dict(), model=name, spec=self.spec.to_dict())
        self.pretrained = None                      # neural.pretrain.Pretrained: set by use_pretrained
        self.unlabelled_reader = None
        if shared.pseudo is not None:               # what this model learns from beside its labels
            teacher, unlabelled = shared.pseudo
            self.run_dir, self.unlabelled_reader = Path(shared.run_dir), StoreReader(unlabelled.path)
            self.unlabelled_names = model_inputs(name, self.unlabelled_reader, self.spec.aggregates)
            self.record["pseudo"] = {"teacher": teacher.record(), "unlabelled": unlabelled.record()}

    def use_pretrained(self, pretrained):
        """Every fold starts from these self-supervised weights; the stores they saw join the record."""
        self.pretrained = pretrained
        self.record["pretrained"] = pretrained.summary()

    def open(self, ids, labels_lab, split_ids):
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.preds.exists():
            outputs.open_predictions(self.preds, ids, self.options.n_folds, split_ids, self.record)
        else:
            outputs.create_predictions(self.preds, ids, labels_lab, self.spec.n_fine,
                                       self.options.n_folds, split_ids, self.record)

    def run_fold(self, k):
        """Train (or reload) fold k and store its out-of-fold rows."""
        held = np.flatnonzero(self.fold == k)              # positions in the labelled ids
        train = np.flatnonzero(self.fold != k)
        assert not np.intersect1d(held, train).size        # a fold model never sees its own OOF rows
        if fold_saved(self.dir, k):
            model = self.load(k)
        else:
            seed = self.options.seed * 100 + k
            pseudo = None if self.unlabelled_reader is None else PseudoLabels(
                pseudo_path(self.run_dir, k), self.unlabelled_reader, self.unlabelled_names, self.options)
            context = FitContext(self.dataset, self.rows[train], self.options.batch_size, self.codebook,
                                 self.class_names, self.pretrained, pseudo)
            model, info = fit_fold(self.spec, context, self.options, seed, self.device,
                                   desc=f"{self.name} fold {k}{self.desc}")
            save_fold(self.dir, k, model, self.spec, info, self.options)
        if self.writes_predictions:         # batch by batch: the fold's (N_held, C) rows are never held whole
            outputs.write_fold_batches(self.preds, k, self.held_batches(model, held))
        else:
            proba = predict_rows([model], self.dataset, self.rows[held], self.options.batch_size,
                                 self.device, self.options.num_workers)
            outputs.write_fold_rows(outputs.fold_rows_path(self.dir, k), k, held, proba)

    def held_batches(self, model, held):
        """Yield (positions (B,) into the labelled ids, proba (B, C)) of fold model `model` on the rows
        `held` (sorted positions); self.rows is sorted, so the store rows come back in `held`'s order."""
        start = 0
        for rows, proba in predict_batches([model], self.dataset, self.rows[held], self.options.batch_size,
                                           self.device, self.options.num_workers):
            positions = held[start:start + len(rows)]
            assert np.array_equal(self.rows[positions], rows)
            start += len(rows)
            yield positions, proba

    def merge_fold_rows(self):
        """Move the rows other ranks left in per-fold files into predictions.h5 (then delete the files).
        Called when no rank writes rows files, so a .tmp there is a killed rank's half-written one: deleted."""
        for k in range(self.options.n_folds):
            path = outputs.fold_rows_path(self.dir, k)
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)
            if path.exists():
                held = np.flatnonzero(self.fold == k)
                outputs.write_fold(self.preds, k, held, outputs.read_fold_rows(path, k, held, self.spec.n_fine))
                path.unlink()

    def pending_folds(self):
        """Folds still to fit or to predict: not marked done in predictions.h5, or without a checkpoint."""
        done, _ = outputs.fold_done(self.preds)
        return [k for k in range(self.options.n_folds) if not (done[k] and fold_saved(self.dir, k))]

    def load(self, k):
        """Fold k's saved model; one made from another spec than this run's is refused."""
        model, spec, _ = load_fold(self.dir, k, self.device)
        if spec != self.spec:
            raise RunError(f"{fold_paths(self.dir, k)[1]}: made with another model spec "
                           f"({options_diff(spec.to_dict(), self.spec.to_dict())}); use another --out or --overwrite")
        return model

    def finish(self, labels_lab, fine_to_coarse):
        # every fold model at once (knn: K banks of the fold's training rows), so only when there is a split
        models = [self.load(k) for k in range(self.options.n_folds)] if self.split_readers else []
        with h5py.File(self.preds, "r+") as h5:
            for split, r in self.split_readers.items():
                for rows, proba in predict_split(models, self.spec, r, self.options.batch_size, self.device,
                                                 self.options.num_workers):
                    outputs.write_split_rows(h5, split, rows, proba)
        oof_pred, _ = outputs.read_oof_argmax(self.preds)                 # (N_lab,): not the (N_lab, C) rows
        metrics = {"oof": challenge_metric(labels_lab, oof_pred, fine_to_coarse), "folds": [],
                   "seconds_per_epoch": []}
        for k in range(self.options.n_folds):
            held = self.fold == k
            metrics["folds"].append(challenge_metric(labels_lab[held], oof_pred[held], fine_to_coarse))
            info = read_record(self.dir, k)[1]["info"]
            metrics["seconds_per_epoch"].append(float(np.mean(info["seconds_per_epoch"])))
        outputs.finish(self.preds, metrics)
        return metrics


def prepare_teacher(cache_dir, run_dir, reader, ids, drawn, options):
    """(Teacher, Unlabelled) when options.teacher names one, checked before anything is written: its
    folds must be the ones this run draws (`drawn`, from folds_to_draw) or has drawn (RUN_DIR/folds.h5),
    its classes and labelled store this run's, and the cache must hold the unlabelled split. None
    without a teacher (a split named by --unlabeled must exist all the same)."""
    if options.unlabeled:
        unlabelled_path(cache_dir, options.unlabeled)
    if not options.teacher:
        return None
    teacher = resolve_teacher(options.teacher)
    fold = drawn[0] if drawn is not None else load_folds(Path(run_dir) / "folds.h5")[1]
    check_teacher(teacher, run_dir, ids, fold, options, reader)
    unlabelled = open_unlabelled(cache_dir, options.unlabeled, reader)
    if unlabelled is None:
        raise RunError(f"{schema.store_path(cache_dir, DEFAULT_SPLIT)}: --teacher needs an unlabelled split to "
                       "pseudo-label and the cache has none; extract one or name it with --unlabeled")
    return teacher, unlabelled


def prepare_run_dir(run_dir, cache_dir, reader, ids, labels_lab, models, options, overwrite, pseudo=None,
                    drawn=None):
    """What is done once, by the main rank: clear the run directory on --overwrite, save (or check) the
    folds, write run.json. -> fold (N_lab,)."""
    if overwrite:                        # only the files a run writes (train_neural refused any other first)
        outputs.RUN_DIR_FILES.clear(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fold = prepare_folds(run_dir, ids, labels_lab, options, drawn)
    write_run_json(run_dir, cache_dir, reader, models, options, pseudo)
    return fold


def open_predictions(runs, ids, labels_lab, split_ids):
    """Main rank: create (or check) each predictions.h5, merge rows left by an interrupted run.
    -> the pending jobs [(model, fold), ...], models in the order given, folds ascending."""
    jobs = []
    for run in runs:
        run.open(ids, labels_lab, split_ids)
        run.merge_fold_rows()
        jobs += [(run.name, k) for k in run.pending_folds()]
    return jobs


def train_neural(cache_dir, out_dir, models, options=None, overwrite=False, world=None):
    """Train each model out-of-fold on CACHE_DIR/labeled.h5 and predict the other splits; under torchrun
    (`world`, default: core.world.current_world()) the fold fits are spread over the ranks.

    -> {model name: metrics dict (per fold and out-of-fold challenge metric, seconds per epoch)}, on every rank."""
    options = (options or NeuralOptions()).check()
    check_params(options.params, models)
    world = world or current_world()
    set_threads(options.threads, world)
    run_dir = Path(out_dir)
    check_apart(run_dir, cache_dir, RunError)
    if overwrite:                       # --overwrite deletes what a run wrote, never anything else
        outputs.RUN_DIR_FILES.refuse_foreign(run_dir, RunError, "train-neural")
    reader = StoreReader(schema.store_path(cache_dir, schema.LABELLED_SPLIT))
    split_readers = {s: StoreReader(schema.store_path(cache_dir, s)) for s in other_splits(cache_dir, options)}
    for r in split_readers.values():
        check_classes(r, {"fine_classes": reader.fine_classes})
    rows, ids, labels = labelled_rows(reader)
    rare = rare_classes_warning(labels[rows], options.n_folds, reader.fine_classes, reader.path.name)
    if rare and world.is_main:
        print(rare, file=sys.stderr, flush=True)
    if groups_mode(options) == "file":  # recorded resolved, like the teacher
        options = replace(options, groups=str(Path(options.groups).resolve()))
    # drawn before anything is written (the teacher's check needs them; auto reads the store once)
    drawn = folds_to_draw(run_dir, ids, labels[rows], options, overwrite, reader, rows) \
        if options.teacher or world.is_main else None
    pseudo = prepare_teacher(cache_dir, run_dir, reader, ids, drawn, options)
    if pseudo is not None:
        options = replace(options, teacher=str(pseudo[0].path))     # recorded resolved
    fold = on_main(world, lambda: prepare_run_dir(run_dir, cache_dir, reader, ids, labels[rows], models,
                                                  options, overwrite, pseudo, drawn))
    device, desc = world.device(), f" (rank {world.rank})" if world.distributed else ""
    shared = RunShared(run_dir, cache_dir, reader, split_readers, options, fold, rows, labels, device,
                       writes_predictions=world.is_main, desc=desc, pseudo=pseudo)
    runs = [ModelRun(name, shared) for name in models]
    if options.pretrain:                # once per pretrainable model, on the main rank, before any fold
        opened = {schema.LABELLED_SPLIT: reader, **split_readers}
        stores = {s: opened[s] if s in opened else StoreReader(schema.store_path(cache_dir, s))
                  for s in pretrain_splits(cache_dir)}
        pretrained = on_main(world, lambda: pretrain_models(run_dir, {r.name: r.spec for r in runs}, stores,
                                                            options, device))
        for run in runs:
            if run.name in pretrained:
                run.use_pretrained(load_pretrained(run_dir, run.spec, options))
    split_ids = {s: r.ids for s, r in split_readers.items()}
    jobs = on_main(world, lambda: open_predictions(runs, ids, labels[rows], split_ids))
    if pseudo is not None:              # every pseudo-label file a pending fit needs, before the fits
        to_fit = sorted({k for name, k in jobs if not fold_saved(run_dir / name, k)})
        on_main(world, lambda: make_pseudo_labels(run_dir, *pseudo, to_fit, device))
    by_name = {run.name: run for run in runs}
    for name, k in rank_jobs(jobs, world):
        by_name[name].run_fold(k)
    world.barrier()                     # every fold's files and rows are written
    for i, run in enumerate(runs):
        if owner(i, world) == world.rank:
            run.merge_fold_rows()
            if not outputs.fold_done(run.preds)[1]:
                run.finish(labels[rows], reader.fine_to_coarse)
    world.barrier()                     # every predictions.h5 is complete
    return {run.name: outputs.read_metrics(run.preds) for run in runs}
