"""`package_model`: RUN_DIR + STACK_DIR (+ the run's cache, read once here) -> one self-contained model
directory (notes/CONTRACTS.md, "Model directory"), the only thing `predict` reads.

    STACK_DIR/model/
        manifest.json      every other file with its sha256 and size (written last)
        model.json         store identity, environment, aggregate options, class order, models, signals
        category_map.csv   the exact CSV the labelled store was extracted with (its sha256 is checked)
        codebook.h5        the cache's codebook (when the run has aggregates)
        neural/run.json, neural/<model>/fold<k>.*      (only the models the stack uses)
        stack/stack.json, stack/stacker/..., stack/reweight.json

Built in a sibling `.tmp` directory and renamed into place, so a crash never leaves a directory under
the real name that looks complete.
"""
import json
import shutil
from pathlib import Path

from core import schema
from core.owned import OwnedFiles
from core.records import read_json, write_json
from features.categories import BUILTIN_MAP
from features.store import StoreReader
from inference.model_dir import (CATEGORY_MAP, CODEBOOK, FORMAT, MODEL_JSON, NEURAL, STACK, VERSION,
                                 file_digest, write_manifest)
from neural.outputs import labelled_store_path, read_run

STACK_FILES = ("stack.json", "reweight.json", "stacker")
# every file a model directory holds; the directories package_model replaces (model/ and its .tmp and
# .old siblings) may hold nothing else
MODEL_DIR_FILES = OwnedFiles(["manifest.json", MODEL_JSON, CATEGORY_MAP, CODEBOOK, f"{NEURAL}/run.json",
                              f"{NEURAL}/*/fold[0-9]*.safetensors", f"{NEURAL}/*/fold[0-9]*.json",
                              *[f"{STACK}/{name}" for name in STACK_FILES], f"{STACK}/stacker/*"])


class PackageError(ValueError):
    """A run or stack that cannot be packaged as it is (another run, a fold model or a file missing)."""


def package_model(run_dir, stack_dir, out_dir=None, category_map=None):
    """Write the model directory of the stack in STACK_DIR (fitted on RUN_DIR) to OUT_DIR (default
    STACK_DIR/model) and return its path. `category_map`: the CSV the run was extracted with, needed only
    when the store does not record where it was and it is not the built-in map."""
    run_dir, stack_dir = Path(run_dir), Path(stack_dir)
    out_dir = Path(out_dir) if out_dir else stack_dir / "model"
    run = read_run(run_dir)
    stack_json = read_json(stack_dir / "stack.json", PackageError, "run `python run.py stack` first")
    _check_same_run(run_dir, run, stack_dir, stack_json)
    check_replaceable(out_dir)
    labelled = labelled_store_path(run)
    with StoreReader(labelled) as reader:
        record = model_record(reader, stack_json)
    cmap = find_category_map(labelled, record, category_map)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _copy_contents(tmp, run_dir, run, stack_dir, stack_json, cmap, record)
        write_json(tmp / MODEL_JSON, record)
        write_manifest(tmp)                       # last: lists exactly what is there
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, out_dir)
    return out_dir


def stack_and_package(run_dir, out_dir, options):
    """`stack`: every input the model directory needs checked first, then the stack fitted and saved in
    OUT_DIR, then OUT_DIR/model written from it; a missing fold file stops it before anything is fitted or
    written. -> (the stack's metrics, the model directory)."""
    from stacking.pipeline import stack
    check_packable(run_dir, options.models, Path(out_dir) / "model")
    metrics = stack(run_dir, out_dir, options)
    return metrics, package_model(run_dir, out_dir)


def check_packable(run_dir, models=(), out_dir=None, category_map=None):
    """What package_model will need from RUN_DIR for the base models `models` (default: the run's), checked
    before the stack is fitted: run.json, every fold file, the labelled store's identity, its category map,
    the codebook; and OUT_DIR, when given, replaceable."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if out_dir is not None:
        check_replaceable(Path(out_dir))
    for model in models or run["models"]:
        _fold_files(run_dir / model, run["n_folds"])
    labelled = labelled_store_path(run)
    with StoreReader(labelled) as reader:
        record = store_record(reader)
    find_category_map(labelled, record, category_map)
    if record["aggregates"] is not None:
        _codebook(run)


def check_replaceable(out_dir):
    """package_model replaces OUT_DIR and deletes its .tmp and .old siblings: each may hold nothing but a
    model directory's files."""
    for path in (out_dir, out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")):
        if path.exists() and not path.is_dir():
            raise PackageError(f"{path}: a file where the model directory goes; packaging would replace it")
        MODEL_DIR_FILES.refuse_foreign(path, PackageError, "packaging the model")


def _check_same_run(run_dir, run, stack_dir, stack_json):
    """The stack must have been fitted on this run (its fingerprint: labelled ids, folds, classes, store)."""
    from stacking.rundir import fingerprint, read_folds
    ids, fold, _ = read_folds(run_dir)
    expected = fingerprint(ids, fold, [str(c) for c in run["fine_classes"]], run.get("store_config"))
    if stack_json.get("fingerprint") != expected:
        raise PackageError(f"{stack_dir / 'stack.json'}: the stack was fitted on another run than {run_dir} "
                           "(labelled ids, folds, classes or store differ)")


IDENTITY_FIELDS = ("frame_encoder", "text_encoder", "category_map_sha256", "precision", "options")


def model_record(reader, stack_json):
    """model.json's content from the labelled store (identity, environment, aggregates, classes) and the
    stack (models, signals)."""
    return {**store_record(reader), "models": list(stack_json["models"]), "signals": list(stack_json["signals"]),
            "run_fingerprint": stack_json["fingerprint"]}


def store_record(reader):
    """model.json's fields that come from the labelled store: identity, environment, aggregates, classes."""
    config = reader.config
    for field in IDENTITY_FIELDS:
        if field not in config:
            raise PackageError(f"{reader.path}: field config.{field} is missing; the store was not made by "
                               "`python run.py extract` of this version (re-extract it with --overwrite)")
    environment = json.loads(reader.attrs.get("environment", "{}"))
    aggregates = None
    if reader.attrs.get("aggregates_complete", False):
        aggregates = json.loads(reader.attrs["agg_options"])
    return {
        "format": FORMAT, "version": VERSION,
        "store_identity": config,
        "precision": config["precision"],
        "runtime": config.get("runtime", "torch"),       # predict's default runtime (features/runtime.py)
        "device": environment.get("device"),
        "environment": environment,
        "aggregates": aggregates,
        "dims": store_dims(reader),
        "fine_classes": reader.fine_classes, "coarse_classes": reader.coarse_classes,
        "fine_to_coarse": reader.fine_to_coarse.tolist(),
        "category_map": {"file": CATEGORY_MAP, "sha256": config["category_map_sha256"],
                         "builtin": config["category_map_sha256"] == file_digest(BUILTIN_MAP)[0]},
    }


def store_dims(reader):
    """{frames F, frame_dim D, tokens T, text_dim Dt} of a store: the widths the fold models read."""
    n_frames, frame_dim = reader.h5[schema.FRAME_EMB].shape[1:]
    n_tokens, text_dim = reader.h5[schema.TEXT_TOKENS].shape[1:]
    return {"frames": int(n_frames), "frame_dim": int(frame_dim), "tokens": int(n_tokens), "text_dim": int(text_dim)}


def find_category_map(store_path, record, given=None):
    """The CSV whose sha256 the store recorded: `given`, else the path the store records (environment
    `category_map_file` or option `category_map`), CACHE/category_map.csv, or the built-in map."""
    want = record["category_map"]["sha256"]
    if given is not None:
        given_sha = file_digest(given)[0]
        if given_sha != want:
            raise PackageError(f"{given}: not the category map {store_path} was extracted with "
                               f"(sha256 {given_sha[:12]}, the store records {want[:12]})")
        return Path(given)
    recorded = [record["environment"].get("category_map_file"),
                record["store_identity"].get("options", {}).get("category_map")]
    for path in [Path(p) for p in recorded if p] + [Path(store_path).parent / CATEGORY_MAP, BUILTIN_MAP]:
        if path.is_file() and file_digest(path)[0] == want:
            return path
    raise PackageError(f"{store_path}: field config.category_map_sha256 is {want[:12]}, and no category map "
                       "CSV with that sha256 is recorded or in the cache; pass the CSV the run was extracted with "
                       "(package_model(..., category_map=PATH))")


def _copy_contents(tmp, run_dir, run, stack_dir, stack_json, cmap, record):
    shutil.copyfile(cmap, tmp / CATEGORY_MAP)
    if record["aggregates"] is not None:
        shutil.copyfile(_codebook(run), tmp / CODEBOOK)
    (tmp / NEURAL).mkdir()
    shutil.copyfile(run_dir / "run.json", tmp / NEURAL / "run.json")
    for model in stack_json["models"]:
        _copy_folds(run_dir / model, tmp / NEURAL / model, run["n_folds"])
    (tmp / STACK).mkdir()
    for name in STACK_FILES:
        src = stack_dir / name
        if not src.exists():
            raise PackageError(f"{src}: missing; rerun `python run.py stack`")
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, tmp / STACK / name)


def _codebook(run):
    codebook = Path(run["cache_dir"]) / CODEBOOK
    if not codebook.is_file():
        raise PackageError(f"{codebook}: missing; the run's aggregates were made with it")
    return codebook


def _fold_files(src, n_folds):
    """The checkpoint files (neural.checkpoint.fold_paths) of folds 0..n_folds-1; a missing one is refused."""
    from neural.checkpoint import fold_paths
    files = [path for k in range(n_folds) for path in fold_paths(src, k)]
    missing = [path for path in files if not path.is_file()]
    if missing:
        raise PackageError(f"{missing[0]}: fold model file missing ({len(missing)} of {len(files)} in {src}); "
                           "finish `python run.py train-neural`")
    return files


def _copy_folds(src, dst, n_folds):
    """The fold files of folds 0..n_folds-1. Nothing else of the run directory travels (no predictions, no
    leftovers of a killed rank)."""
    files = _fold_files(src, n_folds)
    dst.mkdir(parents=True)
    for path in files:
        shutil.copyfile(path, dst / path.name)


def _move_into_place(tmp, out_dir):
    """Rename the finished tmp directory onto out_dir (an older model directory there is replaced)."""
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
