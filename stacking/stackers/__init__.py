"""The registry of stackers: one module each, listed once here, plus every stacker an installed package
registers under the entry-point group `shortvideo.stackers` (core/components.py);
`stack --stacker/--compare/--param` read it.

A new stacker is a module with a `Stacker` subclass (kind, summary, Params; fit, predict_proba, and
its arrays' save/restore) and its line in BUILT_IN, or, from the user's own package, an entry point
`KIND = package.module:Class`.

Parameters come from three places, later ones winning: the stacker's declared defaults; the values
the stack itself supplies to every stacker that declares them (SHARED: --threads, --seed, the run's
fine_to_coarse); and the user's overrides, `name=value` (every stacker in use that declares `name`)
or `kind.name=value` (that stacker only).
"""
from dataclasses import fields
from pathlib import Path

from core.components import installed, not_installed, origin
from core.records import read_json
from stacking.stackers.average import AverageStacker
from stacking.stackers.base import Stacker, StackerError, StackInput, declared
from stacking.stackers.lgbm import LGBMStacker
from stacking.stackers.logreg import LogisticStacker
from stacking.stackers.rerank import RerankStacker

BUILT_IN = (RerankStacker, LGBMStacker, LogisticStacker, AverageStacker)


def _discover():
    """{kind: (class, origin)}: the built-in stackers, then the installed ones; a kind declared twice, or
    an entry point that is not a Stacker of its own name, is refused naming it."""
    found = {cls.kind: (cls, origin(cls)) for cls in BUILT_IN}
    for name, cls, where in installed("stackers"):
        if not (isinstance(cls, type) and issubclass(cls, Stacker)) or cls.kind != name:
            raise StackerError(f"entry point '{name}' of group shortvideo.stackers ({where['module']} of "
                               f"{where['package']} {where['version']}) is not a Stacker subclass of kind '{name}'")
        if name in found:
            raise StackerError(f"stacker '{name}' is declared twice: by {found[name][1]['module']} and by "
                               f"{where['module']} of {where['package']}")
        found[name] = (cls, where)
    return found


_FOUND = _discover()
STACKERS = {kind: cls for kind, (cls, _) in _FOUND.items()}


def stacker_origin(kind):
    """{"module", "package", "version"} of the stacker `kind` (what stacker.json records)."""
    _class(kind)
    return _FOUND[kind][1]
SHARED = ("threads", "seed", "fine_to_coarse")       # set by the stack, not by overrides

__all__ = ["STACKERS", "SHARED", "stacker_origin", "StackInput", "StackerError", "load_stacker", "make_stacker",
           "stacker_params", "parse_overrides", "check_overrides", "describe_stackers", "describe_params"]


def _class(kind):
    if kind not in STACKERS:
        raise StackerError(f"unknown stacker '{kind}'; choose one of {', '.join(STACKERS)}")
    return STACKERS[kind]


def make_stacker(kind, **params):
    """A fresh, unfitted stacker of `kind` with `params` (the rest at their declared defaults)."""
    return _class(kind)(**params)


def _names(kind):
    return [f.name for f in fields(_class(kind).Params)]


def check_overrides(overrides, kinds):
    """Refuse an unknown kind, and an override no stacker in `kinds` would use (a misspelt one would
    otherwise be silently ignored)."""
    for kind in kinds:
        _class(kind)
    for key in overrides:
        kind, _, name = key.rpartition(".")
        if name in SHARED:
            raise StackerError(f"stacker parameter '{key}': {name} comes from the stack itself "
                               "(--threads, --seed, the run's classes), not from --param")
        if kind and kind not in kinds:
            raise StackerError(f"stacker parameter '{key}': '{kind}' is not used here "
                               f"(--stacker and --compare name {', '.join(kinds) or 'none'})")
        users = [kind] if kind else list(kinds)
        if not any(name in _names(k) for k in users):
            have = sorted({n for k in users for n in _names(k) if n not in SHARED})
            raise StackerError(f"stacker parameter '{key}': not a parameter of {', '.join(users)} "
                               f"(they have: {', '.join(have) or 'none'})")


def stacker_params(kind, shared, overrides):
    """The parameters to make `kind` with: the `shared` values it declares, then its overrides."""
    names = _names(kind)
    params = {k: v for k, v in shared.items() if k in names}
    for key, value in overrides.items():
        scope, _, name = key.rpartition(".")
        if scope in ("", kind) and name in names:
            params[name] = value
    return params


def parse_overrides(texts):
    """{"[kind.]name": value} from `[kind.]name=value` strings, each value of its parameter's type."""
    out = {}
    for text in texts:
        key, sep, raw = text.partition("=")
        kind, _, name = key.strip().rpartition(".")
        types = {f.type for k in ([kind] if kind else STACKERS) for f in fields(_class(k).Params) if f.name == name}
        if not sep or not name:
            raise StackerError(f"stacker parameter '{text}': expected [kind.]name=value")
        if len(types) != 1 or next(iter(types)) not in (int, float, str):
            raise StackerError(f"stacker parameter '{text}': no settable parameter '{name}' "
                               f"{'of ' + kind if kind else 'in any stacker'}")
        try:
            out[key.strip()] = next(iter(types))(raw.strip())
        except ValueError as err:
            raise StackerError(f"stacker parameter '{text}': {err}") from err
    return out


def describe_stackers():
    """'kind: summary; ...' for the --stacker help."""
    return "; ".join(f"{kind}: {cls.summary}" for kind, cls in STACKERS.items())


def describe_params():
    """Every settable parameter with its default, per stacker, for the --param help."""
    parts = []
    for kind, cls in STACKERS.items():
        settable = [f"{name}={default} ({help})" for name, default, help in declared(cls.Params)
                    if name not in SHARED]
        if settable:
            parts.append(f"{kind}: " + ", ".join(settable))
    return "; ".join(parts)


def load_stacker(path):
    """The fitted stacker saved in directory `path` by `Stacker.save`."""
    path = Path(path)
    meta = read_json(path / "stacker.json", error=StackerError, hint="no fitted stacker here")
    for key in ("kind", "params", "learned"):
        if key not in meta:
            raise StackerError(f"{path}/stacker.json: field '{key}' is missing")
    if meta["kind"] not in STACKERS:                      # made by a stacker whose package is not installed
        raise StackerError(str(not_installed(path / "stacker.json", "stacker", meta["kind"], meta.get("component"))))
    stacker = make_stacker(meta["kind"], **meta["params"])
    try:
        stacker.restore(path, meta["learned"])
    except KeyError as err:
        raise StackerError(f"{path}/stacker.json: field 'learned.{err.args[0]}' is missing") from err
    return stacker
