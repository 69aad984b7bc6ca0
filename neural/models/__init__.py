"""The models, one registry: name -> ModelEntry (class, store inputs, its Params, what it needs to initialise).

A model is one module of this package defining ENTRY (neural/models/base.py), found by scanning the
package (pkgutil), or one module of an installed package registered under the entry-point group
`shortvideo.models` (core/components.py). Nothing lists them by hand: ENTRY.order gives the default
training order, ENTRY.default=False keeps an optional model out of the default set, and ENTRY.Params
declares its own parameters, which `train-neural --param [MODEL.]NAME=VALUE` sets. Shared layers are
in blocks.py.
"""
import importlib
import pkgutil
from dataclasses import asdict, fields
from functools import lru_cache

from core.components import installed, origin
from neural.data import AGG_COMMAND, agg_names
from neural.models.base import FitContext, FoldModel, ModelEntry, settable   # noqa: F401  (the contract)


class ModelNameError(ValueError):
    """A model name the registry does not know, or an empty model list."""


class ModelParamError(ValueError):
    """A --param that no model in use declares, or a value its model refuses."""


def _package_entries():
    """(entry, origin) of every module of this package that defines ENTRY."""
    out = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "ENTRY", None), ModelEntry):
            out.append((module.ENTRY, origin(module)))
    return out


def _installed_entries():
    """(entry, origin) of every `shortvideo.models` entry point (a module with ENTRY, or a ModelEntry)."""
    out = []
    for name, obj, where in installed("models"):
        entry = obj if isinstance(obj, ModelEntry) else getattr(obj, "ENTRY", None)
        if not isinstance(entry, ModelEntry) or entry.name != name:
            raise ModelNameError(f"entry point '{name}' of group shortvideo.models ({where['module']} of "
                                 f"{where['package']}) is not a ModelEntry named '{name}' nor a module with one")
        out.append((entry, where))
    return out


@lru_cache(maxsize=None)
def _discovered():
    """{name: (entry, origin)} in training order; a name declared twice is refused naming both modules."""
    found = {}
    for entry, where in _package_entries() + _installed_entries():
        if entry.name in found:
            raise ModelNameError(f"model '{entry.name}' is declared twice: by {found[entry.name][1]['module']} "
                                 f"and by {where['module']}")
        found[entry.name] = (entry, where)
    return dict(sorted(found.items(), key=lambda item: (item[1][0].order, item[0])))


def rediscover():
    """Forget what was found (after a module was added to the package or a package installed)."""
    _discovered.cache_clear()


def registry():
    """{name: ModelEntry} of every model found, in the default training order."""
    return {name: entry for name, (entry, _) in _discovered().items()}


def model_origin(name):
    """{"module", "package", "version"} of the module that declared model `name`."""
    model_entry(name)
    return _discovered()[name][1]


def __getattr__(name):
    """REGISTRY, MODEL_NAMES (every model) and DEFAULT_MODELS (those trained when none are named): found
    when asked, so a module added to the package is seen after rediscover()."""
    if name == "REGISTRY":
        return registry()
    if name == "MODEL_NAMES":
        return tuple(registry())
    if name == "DEFAULT_MODELS":
        return tuple(n for n, e in registry().items() if e.default)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _choices():
    return ", ".join(registry())


def model_entry(name):
    models = registry()
    if name not in models:
        raise ModelNameError(f"unknown model {name!r}; choose from {_choices()}")
    return models[name]


def parse_models(text):
    """'single,dual' -> ('single', 'dual'); an unknown name or an empty list is refused, naming the models."""
    chosen = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in chosen if n not in registry()]
    if unknown:
        raise ModelNameError(f"unknown model(s) {', '.join(map(repr, unknown))}; choose from {_choices()}")
    if not chosen:
        raise ModelNameError(f"no model named in {text!r}; choose from {_choices()}")
    return chosen


def models_help():
    """`train-neural --models` help: every model with its one line (an optional one says so)."""
    lines = "; ".join(f"{e.name}: {e.help}" + ("" if e.default else " (optional: only when named)")
                      for e in registry().values())
    return f"Comma-separated models; default: every model the cache allows that is not optional. {lines}."


def params_help():
    """`train-neural --param` help: every settable model parameter with its default and help, per model."""
    parts = []
    for name, entry in registry().items():
        own = [f"{n}={d} ({h})" for n, _, d, h in settable(entry.Params)]
        if own:
            parts.append(f"{name}: " + ", ".join(own))
    return ("A model's own parameter, [MODEL.]NAME=VALUE (repeatable); NAME=VALUE sets it for every model in use "
            "that declares it. " + "; ".join(parts) + ".")


def parse_params(texts):
    """{"[model.]name": value} from `[model.]name=value` strings, each value of its declared type."""
    out = {}
    for text in texts:
        key, sep, raw = text.partition("=")
        model, _, name = key.strip().rpartition(".")
        if not sep or not name:
            raise ModelParamError(f"model parameter '{text}': expected [MODEL.]NAME=VALUE")
        entries = [model_entry(model)] if model else list(registry().values())
        types = {t for e in entries for n, t, _, _ in settable(e.Params) if n == name}
        if len(types) != 1:
            raise ModelParamError(f"model parameter '{text}': no settable parameter '{name}' "
                                  f"{'of ' + model if model else 'in any model'}"
                                  + ("" if len(types) < 2 else " with one type; name the model"))
        out[key.strip()] = _typed(next(iter(types)), raw.strip(), text)
    return out


def _typed(kind, raw, text):
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ModelParamError(f"model parameter '{text}': expected true or false")
        return raw.lower() in ("true", "1", "yes")
    try:
        return kind(raw)
    except ValueError as err:
        raise ModelParamError(f"model parameter '{text}': {err}") from err


def check_params(overrides, models):
    """Refuse an override for a model not in use, or one no model in `models` declares (a misspelt one
    would otherwise be silently ignored), and any value a model's Params.check refuses."""
    for key in overrides:
        model, _, name = key.rpartition(".")
        if model and model not in models:
            model_entry(model)
            raise ModelParamError(f"model parameter '{key}': model '{model}' is not trained here "
                                  f"(the models: {', '.join(models)})")
        users = [model] if model else list(models)
        if not any(name == n for u in users for n, *_ in settable(model_entry(u).Params)):
            have = sorted({f"{u}.{n}" for u in users for n, *_ in settable(model_entry(u).Params)})
            raise ModelParamError(f"model parameter '{key}': not a settable parameter of {', '.join(users)} "
                                  f"(they have: {', '.join(have) or 'none'})")
    for model in models:
        model_params(model, overrides)


def model_params(model, overrides):
    """Model `model`'s Params: its declared defaults, then the overrides that name it or no model."""
    entry = model_entry(model)
    names = {n for n, *_ in settable(entry.Params)}
    values = {}
    for key, value in overrides.items():
        scope, _, name = key.rpartition(".")
        if scope in ("", model) and name in names:
            values[name] = value
    params = entry.Params(**values)
    check = getattr(params, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise ModelParamError(f"model parameter of {model}: {err}") from err
    return params


def spec_params(spec):
    """The Params instance a ModelSpec records (spec.params, a dict), checked against the declaration."""
    entry = model_entry(spec.model)
    known = {f.name for f in fields(entry.Params)}
    unknown = sorted(set(spec.params) - known)
    if unknown:
        raise ModelParamError(f"model spec of {spec.model}: unknown parameter(s) {', '.join(unknown)} "
                              f"(it declares: {', '.join(sorted(known)) or 'none'})")
    return entry.Params(**spec.params)


def legacy_fields():
    """{old flat field (vlad_pooling, knn_k, ...): (model, its Params name)} from every entry's `legacy`."""
    return {old: (entry.name, new) for entry in registry().values() for old, new in entry.legacy}


def lift_legacy(values, key_for):
    """`values` (a spec's or options' fields) with each old flat field (the entries' `legacy` names: vlad_pooling,
    knn_k, ...) moved into values["params"] under key_for(model, name, value), or dropped where that is None;
    `values` itself when it has none."""
    legacy = legacy_fields()
    if not any(name in legacy for name in values):
        return values
    values = dict(values)
    params = dict(values.get("params", {}))
    for old in [n for n in values if n in legacy]:
        model, new = legacy[old]
        value = values.pop(old)
        key = key_for(model, new, value)
        if key is not None:
            params[key] = value
    values["params"] = params
    return values


def as_record(params):
    return asdict(params)


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
