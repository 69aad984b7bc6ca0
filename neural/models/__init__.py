"""The models, one registry: name -> ModelEntry (class, store inputs, what it needs to initialise).

Each model is one module of this package defining ENTRY (neural/models/base.py); it is listed once in
_MODULES, whose order is the default training order. Shared layers are in blocks.py.
"""
from neural.data import AGG_COMMAND, agg_names
from neural.models import cross, dual, frames, knn, linear, mlp, names, single, vlad
from neural.models.base import FitContext, FoldModel, ModelEntry   # noqa: F401  (the contract, re-exported)

_MODULES = (single, dual, cross, vlad, mlp, linear, frames, names, knn)
REGISTRY = {m.ENTRY.name: m.ENTRY for m in _MODULES}
MODEL_NAMES = tuple(REGISTRY)


class ModelNameError(ValueError):
    """A model name the registry does not know, or an empty model list."""


def model_entry(name):
    if name not in REGISTRY:
        raise ModelNameError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    return REGISTRY[name]


def parse_models(text):
    """'single,dual' -> ('single', 'dual'); an unknown name or an empty list is refused, naming the models."""
    chosen = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in chosen if n not in REGISTRY]
    if unknown:
        raise ModelNameError(f"unknown model(s) {', '.join(map(repr, unknown))}; choose from {', '.join(MODEL_NAMES)}")
    if not chosen:
        raise ModelNameError(f"no model named in {text!r}; choose from {', '.join(MODEL_NAMES)}")
    return chosen


def models_help():
    """`train-neural --models` help: every model with its one line."""
    lines = "; ".join(f"{e.name}: {e.help}" for e in REGISTRY.values())
    return (f"Comma-separated models; default: every model the cache allows. {lines}.")


def build_model(spec):
    """A fold model from its ModelSpec alone, in its random initialisation (then load or initialise it)."""
    return model_entry(spec.model).cls(spec)


def model_inputs(name, reader, aggregates=None):
    """Dataset names model `name` reads from this store (`aggregates`: the agg/* names a trained model
    read, else every one the store has); a missing one raises StoreError naming its command."""
    entry = model_entry(name)
    names = list(entry.inputs)
    for dataset in names:
        reader.require(dataset)
    if entry.reads_aggregates:
        aggregates = agg_names(reader) if aggregates is None else list(aggregates)
        for dataset in aggregates:
            reader.require(dataset, AGG_COMMAND)
        names += aggregates
    return names
