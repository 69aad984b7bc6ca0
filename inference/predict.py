"""`predict`: label new videos with a model directory (inference/package.py), nothing else.

    MODEL_DIR (verified against its manifest; model.json and stack.json read once)
    raw videos --extract (recorded encoders, options, precision; the NEW data's frame layout)--> CACHE/<split>.h5
               --identity check against model.json (encoders' sha256, options, precision, dims)
               --aggregates (MODEL_DIR/codebook.h5, never refitted)--> agg/*
               --fold models (neural.predict.predict_store on MODEL_DIR/neural)--> {model: (N, C)}
               --stacker + reweighting (MODEL_DIR/stack)--> id,category_id lines

The training cache and run directory are not read: the model directory carries all of it.
"""
from dataclasses import fields
from pathlib import Path

import numpy as np

from features import schema
from features.frames import detect_source
from features.records import options_diff
from features.store import NOT_FEATURES, StoreReader, feature_identity
from inference.model_dir import open_model_dir
from inference.package import store_dims

class PredictError(ValueError):
    pass


def predict(data_dir, split, model_dir, out_file, cache_dir=None, runtime=None):
    """Label the videos of DATA_DIR's split `split` into out_file (`id,category_id`, no header);
    returns (N,) fine class indices. The new store goes to cache_dir (default OUT_FILE.cache/). `runtime`:
    the encoders' runtime, default the recorded one; another must be interchangeable with it."""
    from features.extract import extract
    from neural.predict import predict_store
    from stacking.submission import write_predictions
    model = open_model_dir(model_dir)
    model.runtime = choose_runtime(model.model_json, runtime)
    cache_dir = _own_cache(cache_dir, out_file, model.path)
    kind = source_kind(data_dir, split, model.model_json)
    extract(data_dir, [split], cache_dir, extract_options(model, kind))
    store_path = schema.store_path(cache_dir, split)
    with StoreReader(store_path) as reader:             # before aggregates: a wrong store goes no further
        check_identity(reader, model.model_json)
    if model.codebook_path is not None:
        from features.aggregates import run_aggregates
        run_aggregates(cache_dir, [split], aggregate_options(model.model_json), codebook_path=model.codebook_path)
    probas = predict_store(model.neural_dir, store_path, model.model_json["models"])
    with StoreReader(store_path) as reader:             # agg/* now present
        ids = reader.ids                                                    # (N,) str
        pred = stack_probas(model, probas, reader, np.arange(len(ids)))
        write_predictions(out_file, ids, pred, model.model_json["fine_classes"], reader)
    return pred


def _own_cache(cache_dir, out_file, model_path):
    """Where the new store goes; never inside the model directory (its manifest would refuse it)."""
    cache_dir = Path(cache_dir) if cache_dir else Path(str(out_file) + ".cache")
    resolved, root = cache_dir.resolve(), model_path.resolve()
    if resolved == root or root in resolved.parents:
        raise PredictError(f"{cache_dir}: is inside the model directory {model_path}; give --cache a directory "
                           "of its own")
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir


def source_kind(data_dir, split, model_json):
    """The new data's frame layout (zip, npy or video); refuses raw media for a model trained on
    precomputed features, and precomputed features for a model trained with a frame encoder."""
    kind = detect_source(data_dir, split)
    trained = model_json["store_identity"]["frame_encoder"]
    if (trained == "precomputed") != (kind == "npy"):
        have = "precomputed frame features (zip_feats)" if kind == "npy" else f"raw frames ({kind})"
        wanted = ("precomputed frame features (zip_feats/<split>.zip)" if trained == "precomputed"
                  else f"raw frames (zip_frames/ or videos/) for its frame encoder {trained}")
        raise PredictError(f"{data_dir}: split '{split}' has {have}, but the model was trained on {wanted}")
    return kind


def extract_options(model, kind):
    """ExtractOptions for a new split: the recorded identity options and precision, this data's layout,
    the model directory's category map, no aggregates (they come after, from the model's codebook)."""
    from features.extract import ExtractOptions
    known = {f.name for f in fields(ExtractOptions)}
    identity = model.model_json["store_identity"]
    recorded = {k: v for k, v in identity.get("options", {}).items() if k in known and k not in NOT_FEATURES}
    recorded["precision"] = identity["precision"]
    recorded["runtime"] = getattr(model, "runtime", None) or identity.get("runtime", "torch")
    return ExtractOptions(**recorded, frames_from=kind, category_map=str(model.category_map_path), aggregates=None)


def choose_runtime(model_json, runtime=None):
    """The encoders' runtime for predict: the one the model's features were made with (a model recording none:
    torch), or `runtime` when its features are interchangeable with those (features/runtime.py)."""
    from features.runtime import RUNTIMES, interchange_class
    identity = model_json["store_identity"]
    recorded, precision = identity.get("runtime", "torch"), identity["precision"]
    if runtime is None:
        return recorded
    if runtime not in RUNTIMES or interchange_class(runtime, precision) != interchange_class(recorded, precision):
        raise PredictError(f"--runtime {runtime}: the model's features were made by {recorded} in {precision} "
                           f"(model.json field store_identity.runtime), and {runtime}'s are not interchangeable with "
                           f"those; interchangeable there: {interchange_class(recorded, precision).split(':')[1]}")
    return runtime


def check_identity(reader, model_json):
    """The new store must hold the features the fold models were trained on: same encoders (and their
    weights' sha256), options, precision, category map, and array widths."""
    diff = options_diff(feature_identity(model_json["store_identity"]), feature_identity(reader.config))
    if diff:
        raise PredictError(f"{reader.path}: made with other encoders, weights, precision or options than the "
                           f"model was trained on ({diff}); use a fresh --cache")
    dims, want = store_dims(reader), model_json["dims"]
    if dims != want:
        raise PredictError(f"{reader.path}: array widths differ from the model's ({options_diff(want, dims)})")
    if reader.fine_classes != model_json["fine_classes"]:
        raise PredictError(f"{reader.path}: field fine_classes differs from the model's "
                           f"({len(reader.fine_classes)} vs {len(model_json['fine_classes'])} classes)")


def aggregate_options(model_json):
    """AggregateOptions the labelled store's agg/* was written with (model.json's `aggregates`)."""
    from features.aggregates import AggregateOptions
    known = {f.name for f in fields(AggregateOptions)}
    recorded = model_json["aggregates"]
    return AggregateOptions(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded.items() if k in known})


def stack_probas(model, probas, reader, rows):
    """{model: (N, C)} of the open store's rows `rows` (N,) -> (N,) fine class indices after the stacker
    and the reweighting."""
    from stacking.reweight import PriorReweighter
    from stacking.signals import build_input
    from stacking.stackers import load_stacker
    meta = model.model_json
    X = build_input(meta["models"], probas, reader, rows, meta["signals"])
    stacker = load_stacker(model.stack_dir / "stacker")
    reweighter = PriorReweighter.load(model.stack_dir / "reweight.json")
    return reweighter.transform(stacker.predict_proba(X)).argmax(axis=1)
