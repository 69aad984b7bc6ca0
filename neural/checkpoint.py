"""A fold model on disk: RUN_DIR/<model>/fold<k>.safetensors (its tensors) + fold<k>.json (its ModelSpec,
fold, training info, options, and the component that made it: module, package, version). Nothing here unpickles: a checkpoint cannot run code when loaded, and
one whose JSON or tensors do not fit its spec is refused naming the file."""
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.records import atomic_path, read_json, write_json
from core.components import not_installed
from neural.models import build_model, model_origin, registry
from neural.outputs import RunError
from neural.spec import ModelSpec, SpecError

FORMAT = "shortvideo-fold"
RECORD_FIELDS = ("format", "spec", "fold", "info", "options")


class CheckpointError(RunError):
    """A fold checkpoint that is missing, not ours, or does not fit its spec."""


def fold_paths(model_dir, k):
    """-> (tensors path, record path) of fold k."""
    return Path(model_dir) / f"fold{k}.safetensors", Path(model_dir) / f"fold{k}.json"


def fold_saved(model_dir, k):
    """Both files there (the record is written last, so it marks a complete checkpoint)."""
    return all(p.exists() for p in fold_paths(model_dir, k))


def save_fold(model_dir, k, model, spec, info, options):
    """Tensors first, then the record, each written atomically."""
    tensors_path, record_path = fold_paths(model_dir, k)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    with atomic_path(tensors_path) as tmp:
        save_file(tensors, str(tmp))
    write_json(record_path, {"format": FORMAT, "spec": spec.to_dict(), "fold": k, "info": info,
                             "options": options.to_dict(), "component": model_origin(spec.model)},
               indent=1, sort_keys=True)


def read_record(model_dir, k):
    """fold<k>.json checked: its format, fields, fold number and spec. -> (ModelSpec, record dict)."""
    tensors_path, path = fold_paths(model_dir, k)
    if not path.exists():
        old = path.with_suffix(".pt")
        hint = (f"; {old.name} is an old pickle checkpoint, never loaded (it could run code): retrain"
                if old.exists() else "; rerun `python run.py train-neural` to finish it")
        raise CheckpointError(f"{path}: fold checkpoint missing{hint}")
    record = read_json(path, CheckpointError)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fold checkpoint record (field 'format' should be {FORMAT!r})")
    for name in RECORD_FIELDS:
        if name not in record:
            raise CheckpointError(f"{path}: field '{name}' is missing")
    if record["fold"] != k:
        raise CheckpointError(f"{path}: field 'fold' is {record['fold']!r}, expected {k}")
    try:
        spec = ModelSpec.from_dict(record["spec"], source=str(path))
    except SpecError as err:
        raise CheckpointError(str(err)) from err
    if spec.model not in registry():               # made by a model whose module is not installed here
        raise CheckpointError(str(not_installed(path, "model", spec.model, record.get("component"))))
    return spec, record


def read_tensors(path):
    """{name: tensor} of a safetensors file; anything else (a pickle, a truncated file) is refused."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); checkpoints are never "
                              "unpickled, retrain this fold") from err


def tensor_mismatch(expected, tensors, source="the spec makes"):
    """What keeps `tensors` from being exactly `expected` ({name: tensor}): names missing or extra, shapes
    that differ (each kind named up to three times); [] when they fit."""
    expected = {name: tuple(t.shape) for name, t in expected.items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    return ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
           ([f"unexpected {', '.join(extra[:3])}"] if extra else []) + \
           [f"{n} is {found[n]}, {source} {expected[n]}" for n in wrong[:3]]


def check_tensors(path, model, tensors):
    """The tensors must be exactly the model's state: no name missing or extra, every shape equal."""
    parts = tensor_mismatch(model.state_dict(), tensors)
    if parts:
        raise CheckpointError(f"{path}: tensors do not fit the model spec in its .json ({'; '.join(parts)})")


def load_fold(model_dir, k, device="cpu"):
    """Fold k's model rebuilt from its spec and tensors alone, in eval mode. -> (model, spec, record)."""
    spec, record = read_record(model_dir, k)
    tensors_path = fold_paths(model_dir, k)[0]
    tensors = read_tensors(tensors_path)
    try:
        model = build_model(spec)
    except ValueError as err:                       # a spec no model can be built from
        raise CheckpointError(f"{fold_paths(model_dir, k)[1]}: {err}") from err
    model.size_from(tensors)                        # a learned size (knn's bank), else nothing
    check_tensors(tensors_path, model, tensors)
    model.load_state_dict(tensors)
    return model.to(device).eval(), spec, record
