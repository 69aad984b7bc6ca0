"""`predict`: label new videos with a saved stack.

    raw videos --extract (the run's encoders and options)--> CACHE/<split>.h5
               --aggregates (the run's codebook)--> agg/*
               --fold models (neural.predict.predict_store)--> {model: (N, C)}
               --stacker + reweighting (STACK_DIR)--> id,category_id lines

The encoders, extract options and aggregate options are recovered from what the run recorded (the
labelled store's config and agg_options attributes, CACHE_DIR/codebook.h5), so a new split goes
through exactly the pipeline the run was trained on; the new store is checked against it.
"""
import json
from dataclasses import fields
from pathlib import Path

import h5py

from features import schema
from features.store import StoreReader
from stacking.reweight import PriorReweighter
from stacking.rundir import LABELLED_SPLIT, fingerprint, read_folds, read_run_config
from stacking.stackers import load_stacker
from stacking.submission import write_predictions


class PredictError(ValueError):
    pass


def read_stack(stack_dir):
    path = Path(stack_dir) / "stack.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PredictError(f"{path}: no saved stack here; run `python run.py stack` first ({err})") from err


def predict_from_probas(stack_dir, probas, store_path, ids, out_file):
    """Stack {model: (N, C)} probabilities of videos `ids` of the store at store_path into out_file."""
    stack_dir = Path(stack_dir)
    meta = read_stack(stack_dir)
    missing = [m for m in meta["models"] if m not in probas]
    if missing:
        raise PredictError(f"{stack_dir}: the stack needs base model(s) {', '.join(repr(m) for m in missing)}, "
                           "which have no predictions here")
    reader = StoreReader(store_path)
    classes = reader.fine_classes
    reader.close()
    if classes != meta["fine_classes"]:
        raise PredictError(f"{store_path}: fine_classes differ from the stack's ({len(classes)} vs "
                           f"{len(meta['fine_classes'])}); extract it with the run's category map")
    from stacking.signals import build_input          # the same features as in `stack`
    X = build_input(meta["models"], probas, store_path, ids, meta["signals"])
    stacker = load_stacker(stack_dir / "stacker")
    reweighter = PriorReweighter.load(stack_dir / "reweight.json")
    pred = reweighter.transform(stacker.predict_proba(X)).argmax(axis=1)
    write_predictions(out_file, ids, pred, meta["fine_classes"], store_path)
    return pred


def check_stack_matches_run(stack_dir, run_dir):
    """The stack must have been fitted on this run's labelled ids, folds, classes and store."""
    meta, config = read_stack(stack_dir), read_run_config(run_dir)
    ids, fold, _ = read_folds(run_dir)
    expected = fingerprint(ids, fold, [str(c) for c in config["fine_classes"]], config.get("store_config"))
    if meta["fingerprint"] != expected:
        raise PredictError(f"{stack_dir}: the stack was fitted on another run than {run_dir} "
                           "(labelled ids, folds, classes or store differ)")
    return meta, config


def extract_options(config, category_map):
    """ExtractOptions rebuilt from the options the labelled store recorded."""
    from features.extract import ExtractOptions
    known = {f.name for f in fields(ExtractOptions)}
    recorded = {k: v for k, v in config["store_config"].get("options", {}).items() if k in known}
    recorded.pop("limit", None)                      # a new split is extracted whole
    if "aggregates" in known:      # agg/* comes after, from the run's own codebook (see predict)
        recorded["aggregates"] = None
    return ExtractOptions(**recorded, category_map=category_map)


def aggregate_options(labelled_store):
    """AggregateOptions the labelled store's agg/* was written with, or None when it has none."""
    from features.aggregates import AggregateOptions
    with h5py.File(labelled_store, "r") as h5:
        if not h5.attrs.get("aggregates_complete", False):
            return None
        recorded = json.loads(h5.attrs["agg_options"])
    known = {f.name for f in fields(AggregateOptions)}
    recorded = {k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded.items() if k in known}
    return AggregateOptions(**recorded)


def _check_same_pipeline(new_store, store_config):
    """Other encoders or options would give features the fold models never saw."""
    reader = StoreReader(new_store)
    config = reader.config
    reader.close()
    new_opts, old_opts = dict(config.get("options", {})), dict(store_config.get("options", {}))
    new_opts.pop("limit", None), old_opts.pop("limit", None)
    if {**config, "options": new_opts} != {**store_config, "options": old_opts}:
        raise PredictError(f"{new_store}: extracted with other encoders, options or category map than "
                           "the run's labelled store; use the run's --category-map, or a fresh --cache")


def predict(data_dir, split, run_dir, stack_dir, out_file, cache_dir=None, category_map=None):
    """Label the videos of DATA_DIR's split `split` into out_file (`id,category_id`, no header)."""
    from features.aggregates import run_aggregates
    from features.extract import extract
    from neural.predict import predict_store
    meta, config = check_stack_matches_run(stack_dir, run_dir)
    run_cache = Path(config["cache_dir"])
    cache_dir = Path(cache_dir) if cache_dir else Path(str(out_file) + ".cache")
    if cache_dir.resolve() == run_cache.resolve():
        raise PredictError(f"{cache_dir}: is the run's own cache; give predict a cache directory of its own")
    cache_dir.mkdir(parents=True, exist_ok=True)
    extract(data_dir, [split], cache_dir, extract_options(config, category_map))
    store_path = schema.store_path(cache_dir, split)
    _check_same_pipeline(store_path, config["store_config"])
    agg = aggregate_options(schema.store_path(run_cache, config.get("split", LABELLED_SPLIT)))
    if agg is not None:
        # the run's codebook, reused as is: refitting it on the new videos would change agg/*
        run_aggregates(cache_dir, [split], agg, codebook_path=run_cache / "codebook.h5")
    probas = predict_store(run_dir, store_path, meta["models"])
    reader = StoreReader(store_path)
    ids = reader.ids
    reader.close()
    return predict_from_probas(stack_dir, probas, store_path, ids, out_file)
