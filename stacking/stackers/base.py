"""The contract every stacker keeps, and how a fitted one is saved and loaded.

    stacker = Kind(**params);  stacker.fit(X, y) -> self;  stacker.predict_proba(X) -> (N, C)
    stacker.save(dir);  stacking.stackers.load_stacker(dir) -> the same predictions

X is a StackInput: the base models' probabilities (M, N, C) and per-video signals (N, S); y (N,) the
class of each video in the run's class map. A stacker declares its parameters as a dataclass `Params`
(defaults and help, via `param`): they become the keyword arguments of its __init__ and attributes of
the same names, so it is a scikit-learn estimator (get_params, set_params, clone). What it learns ends
in `_`. A saved stacker is a directory: its arrays (`_save_arrays`: .npz, a booster's text file) and
stacker.json ({"kind", "params", "learned"}), written last, so a directory with stacker.json is whole.
No pickle: loading runs no code from the directory.
"""
import inspect
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from core.components import origin
from core.records import atomic_path, write_json


class StackerError(ValueError):
    """An unknown stacker or parameter, or a saved stacker that cannot be read."""


@dataclass
class StackInput:
    probas: np.ndarray      # (M, N, C) float32 base model probabilities
    signals: np.ndarray     # (N, S) float32 per-video signals

    def take(self, rows):
        return StackInput(self.probas[:, rows], self.signals[rows])

    def __len__(self):
        return self.probas.shape[1]

    @property
    def n_classes(self):
        return self.probas.shape[2]


def param(default, help):
    """A declared stacker parameter: its default and one line of help (shown by `stack --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class NoParams:
    """A stacker without parameters."""


def declared(params_cls):
    """[(name, default, help)] of a Params dataclass, in declaration order."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(params_cls)]


def _signature(params_cls):
    """The keyword-only __init__ signature of a stacker with parameters `params_cls` (what scikit-learn's
    get_params reads): one keyword per field of Params, with its default."""
    keywords = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
                for f in fields(params_cls)]
    return inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *keywords])


class Stacker(ClassifierMixin, BaseEstimator):
    """Base class: a scikit-learn classifier whose parameters are its `Params` fields (keyword arguments of
    __init__, attributes of the same names; get_params, set_params and clone work), with save/load of
    stacker.json; subclasses fit and predict_proba. The columns of predict_proba are the run's classes
    (classes_ = 0..C-1), whether fit saw a class or not."""
    kind = ""
    summary = ""                     # one line for `stack --help`
    Params = NoParams

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in vars(cls):          # each stacker's __init__ says its own Params' keywords
            def __init__(self, **params):
                Stacker.__init__(self, **params)
            __init__.__signature__ = _signature(cls.Params)
            cls.__init__ = __init__

    def __init__(self, **params):
        names = [f.name for f in fields(self.Params)]
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise StackerError(f"stacker '{self.kind}' has no parameter {', '.join(unknown)}; "
                               f"it has: {', '.join(names) or 'none'}")
        for f in fields(self.Params):            # as given: scikit-learn's clone checks they are the same objects
            setattr(self, f.name, params.get(f.name, f.default))

    @property
    def params(self):
        """The parameters as the stacker's Params dataclass (what stacker.json records)."""
        return self.Params(**self.get_params(deep=False))

    @property
    def classes_(self):
        """(C,) the class of each predict_proba column: every class of the run, seen in fit or not."""
        return np.arange(self.n_classes_)

    def predict(self, X):
        """(N,) the most probable class of each video (ClassifierMixin's score uses it)."""
        return self.predict_proba(X).argmax(axis=1)

    def fit(self, X, y):
        raise NotImplementedError

    def predict_proba(self, X):
        raise NotImplementedError

    def report(self, X, y):
        """Extra numbers for metrics.json after the final fit on (X, y); none by default."""
        return {}

    def learned(self):
        """The JSON-able part of what was learned (arrays go to `_save_arrays`)."""
        return {"n_classes_": self.n_classes_}

    def restore(self, path, learned):
        """Set what was learned from stacker.json's `learned` and the arrays in `path`."""
        self.n_classes_ = learned["n_classes_"]

    def _save_arrays(self, path):
        """Write the learned arrays into directory `path` (atomically, one file each)."""

    def save(self, path, component=None):
        """stacker.json and the arrays into directory `path`; `component`: what made it (the registry's
        stacker_origin, which knows an entry point's package), else this class's module in this project."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._save_arrays(path)
        write_json(path / "stacker.json", {"kind": self.kind, "params": asdict(self.params),
                                           "learned": self.learned(), "component": component or origin(type(self))})
        return path


def save_npz(path, **arrays):
    """np.savez to `path` atomically (through an open file: np.savez would append .npz to a .tmp name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_npz(path, names):
    """{name: array} of `names` from an .npz written by save_npz; a missing file or array names it."""
    try:
        with np.load(path) as arrays:
            missing = [n for n in names if n not in arrays.files]
            if missing:
                raise StackerError(f"{path}: array(s) {', '.join(missing)} missing from the saved stacker")
            return {n: arrays[n] for n in names}
    except OSError as err:
        raise StackerError(f"{path}: cannot read the saved stacker's arrays: {err}") from err
