"""Second-level models over the base models' probabilities, all with one contract.

    stacker.fit(X, y) -> self;  stacker.predict_proba(X) -> (N, C);  stacker.save(dir);  load_stacker(dir)

X is a StackInput: the base models' probabilities (M, N, C) and per-video signals (N, S). What a
stacker learns ends in `_`. Four of them:
- AverageStacker: the plain mean of the base models (the baseline every stack must beat);
- LogisticStacker: multinomial logistic regression on the probabilities and the signals;
- LGBMStacker: one multiclass LightGBM on all probabilities and signals (C trees per round);
- RerankStacker: a binary LightGBM over (video, candidate) rows for each video's top-k classes of
  the average, so the cost does not grow with C trees per round (features: each model's probability
  of the candidate, its rank and ratio to that model's top-1, the candidate's prior and id, the signals).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

EPS = 1e-6


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


def _write_meta(path, kind, params, learned):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "stacker.json", "w", encoding="utf-8") as fh:
        json.dump({"kind": kind, "params": params, "learned": learned}, fh, indent=1)
    return path


class AverageStacker:
    kind = "average"

    def __init__(self):
        self.params = {}

    def fit(self, X, y):
        self.n_classes_ = X.n_classes
        return self

    def predict_proba(self, X):
        return X.probas.mean(axis=0)

    def save(self, path):
        _write_meta(path, self.kind, self.params, {"n_classes_": self.n_classes_})

    def _restore(self, path, learned):
        self.n_classes_ = learned["n_classes_"]


class LogisticStacker:
    """Multinomial logistic regression on [p_1 .. p_M, signals], standardised.

    Probabilities rather than log-probabilities, and C = 0.1: both scored better out-of-fold on a
    2,048-video fashion run (0.747 against 0.725 for log-probabilities). One BLAS thread: lbfgs
    with more threads ran ~100x slower on the shared 2-core machine.
    """
    kind = "logreg"

    def __init__(self, C=0.1, max_iter=300, seed=0):
        self.params = {"C": C, "max_iter": max_iter, "seed": seed}

    @staticmethod
    def _features(X):
        m, n, c = X.probas.shape
        return np.concatenate([X.probas.transpose(1, 0, 2).reshape(n, m * c), X.signals], axis=1)

    def fit(self, X, y):
        features = self._features(X)                                      # (N, M*C + S)
        self.mean_, self.scale_ = features.mean(axis=0), features.std(axis=0) + 1e-6
        self.model_ = LogisticRegression(C=self.params["C"], max_iter=self.params["max_iter"],
                                         random_state=self.params["seed"])
        with threadpool_limits(1):
            self.model_.fit((features - self.mean_) / self.scale_, y)
        self.n_classes_ = X.n_classes
        return self

    def predict_proba(self, X):
        z = (self._features(X) - self.mean_) / self.scale_
        out = np.zeros((len(X), self.n_classes_), np.float32)
        out[:, self.model_.classes_] = self.model_.predict_proba(z)   # classes unseen in fit stay 0
        return out

    def save(self, path):
        path = _write_meta(path, self.kind, self.params, {"n_classes_": self.n_classes_})
        np.savez(path / "logreg.npz", mean_=self.mean_, scale_=self.scale_, coef_=self.model_.coef_,
                 intercept_=self.model_.intercept_, classes_=self.model_.classes_)

    def _restore(self, path, learned):
        self.n_classes_ = learned["n_classes_"]
        arrays = np.load(Path(path) / "logreg.npz")
        self.mean_, self.scale_ = arrays["mean_"], arrays["scale_"]
        self.model_ = LogisticRegression()
        self.model_.coef_, self.model_.intercept_ = arrays["coef_"], arrays["intercept_"]
        self.model_.classes_ = arrays["classes_"]


def _lgb_params(objective, params, extra=None):
    out = {"objective": objective, "learning_rate": params["learning_rate"],
           "num_leaves": params["num_leaves"], "min_data_in_leaf": params["min_data_in_leaf"],
           "feature_fraction": params["feature_fraction"], "lambda_l2": params["lambda_l2"],
           "max_bin": params["max_bin"], "num_threads": params["threads"], "seed": params["seed"],
           "deterministic": True, "force_row_wise": True, "verbose": -1}
    out.update(extra or {})
    return out


class _BoosterMixin:
    def _save_booster(self, path, learned):
        path = _write_meta(path, self.kind, self.params, learned)
        self.booster_.save_model(str(path / "booster.txt"))

    def _load_booster(self, path):
        self.booster_ = lgb.Booster(model_file=str(Path(path) / "booster.txt"))


class LGBMStacker(_BoosterMixin):
    """One multiclass LightGBM on [p_1 .. p_M, signals]: one tree per class per boosting round.

    Only the classes seen in training are modelled (their probability columns are the features):
    a class map of 200 with 74 classes present grows 74 trees a round, not 200.
    """
    kind = "lgbm"

    def __init__(self, n_rounds=100, learning_rate=0.1, num_leaves=15, min_data_in_leaf=20,
                 feature_fraction=0.5, lambda_l2=1.0, max_bin=63, threads=1, seed=0):
        self.params = {"n_rounds": n_rounds, "learning_rate": learning_rate, "num_leaves": num_leaves,
                       "min_data_in_leaf": min_data_in_leaf, "feature_fraction": feature_fraction,
                       "lambda_l2": lambda_l2, "max_bin": max_bin, "threads": threads, "seed": seed}

    def _features(self, X):
        m, n, _ = X.probas.shape
        probas = X.probas[:, :, self.classes_].transpose(1, 0, 2).reshape(n, m * len(self.classes_))
        return np.concatenate([probas, X.signals], axis=1)

    def fit(self, X, y):
        self.n_classes_, self.classes_ = X.n_classes, np.unique(y)
        target = np.searchsorted(self.classes_, y)
        data = lgb.Dataset(self._features(X), label=target, free_raw_data=True)
        params = _lgb_params("multiclass", self.params, {"num_class": len(self.classes_)})
        self.booster_ = lgb.train(params, data, num_boost_round=self.params["n_rounds"])
        return self

    def predict_proba(self, X):
        out = np.zeros((len(X), self.n_classes_), np.float32)
        out[:, self.classes_] = self.booster_.predict(self._features(X)).reshape(len(X), -1)
        return out

    def save(self, path):
        self._save_booster(path, {"n_classes_": self.n_classes_, "classes_": self.classes_.tolist()})

    def _restore(self, path, learned):
        self.n_classes_, self.classes_ = learned["n_classes_"], np.asarray(learned["classes_"], np.int64)
        self._load_booster(path)


def _coarse_mass(proba, fine_to_coarse, cand):
    """(N, K) probability of each candidate's coarse class: the sum over its fine classes."""
    mass = np.zeros((len(proba), fine_to_coarse.max() + 1), np.float32)           # (N, C1)
    for c1 in range(mass.shape[1]):
        mass[:, c1] = proba[:, fine_to_coarse == c1].sum(axis=1)
    return np.take_along_axis(mass, fine_to_coarse[cand], axis=1)


def _ranks(proba, p, step=5000):
    """(N, K) how many classes each candidate's probability p (N, K) is beaten by in proba (N, C)."""
    out = np.empty(p.shape, np.int32)
    for s in range(0, len(p), step):             # in chunks: the comparison is (step, K, C)
        out[s:s + step] = (proba[s:s + step, None, :] > p[s:s + step, :, None]).sum(axis=2)
    return out


class RerankStacker(_BoosterMixin):
    """Binary LightGBM scoring each video's top-k candidate classes of the base models' average."""
    kind = "rerank"

    def __init__(self, top_k=10, n_rounds=300, learning_rate=0.05, num_leaves=31, min_data_in_leaf=40,
                 feature_fraction=0.8, lambda_l2=1.0, max_bin=255, threads=1, seed=0, batch_size=20000,
                 fine_to_coarse=None):
        # fine_to_coarse (C,): adds each model's probability mass on the candidate's coarse class
        self.params = {"top_k": top_k, "n_rounds": n_rounds, "learning_rate": learning_rate,
                       "fine_to_coarse": None if fine_to_coarse is None else [int(c) for c in fine_to_coarse],
                       "num_leaves": num_leaves, "min_data_in_leaf": min_data_in_leaf,
                       "feature_fraction": feature_fraction, "lambda_l2": lambda_l2, "max_bin": max_bin,
                       "threads": threads, "seed": seed, "batch_size": batch_size}

    def candidates(self, X):
        """(N, K) class indices: the top-k of the average, best first."""
        k = min(self.params["top_k"], X.n_classes)
        mean = X.probas.mean(axis=0)                                     # (N, C)
        top = np.argpartition(-mean, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(mean, top, axis=1), axis=1)
        return np.take_along_axis(top, order, axis=1)

    def _features(self, X, cand):
        """(N*K, F) rows for (video, candidate) pairs; the last column is the class id (categorical)."""
        n, k = cand.shape
        cols = []
        for proba in X.probas:                                           # proba (N, C)
            p = np.take_along_axis(proba, cand, axis=1)                  # (N, K)
            rank = _ranks(proba, p)                                      # (N, K) 0 = that model's top-1
            cols += [p, rank, p / (proba.max(axis=1, keepdims=True) + EPS)]
            if self.params["fine_to_coarse"] is not None:
                cols.append(_coarse_mass(proba, np.asarray(self.params["fine_to_coarse"]), cand))
        cols += [np.take_along_axis(X.probas.mean(axis=0), cand, axis=1),
                 np.broadcast_to(np.arange(k), (n, k)),
                 np.log1p(self.prior_counts_[cand])]
        cols += [np.broadcast_to(s[:, None], (n, k)) for s in X.signals.T]
        cols.append(cand)
        return np.stack([np.asarray(c, np.float32) for c in cols], axis=2).reshape(n * k, -1)

    def fit(self, X, y):
        self.n_classes_ = X.n_classes
        self.prior_counts_ = np.bincount(y, minlength=self.n_classes_).astype(np.float32)
        cand = self.candidates(X)
        self.train_recall_ = float((cand == y[:, None]).any(axis=1).mean())
        target = (cand == y[:, None]).reshape(-1).astype(np.float32)
        features = self._features(X, cand)
        data = lgb.Dataset(features, label=target, categorical_feature=[features.shape[1] - 1],
                           free_raw_data=True)
        self.booster_ = lgb.train(_lgb_params("binary", self.params), data,
                                  num_boost_round=self.params["n_rounds"])
        return self

    def predict_proba(self, X):
        """(N, C): candidates' scores normalised per video; classes outside the top-k get 0."""
        out = np.zeros((len(X), self.n_classes_), np.float32)
        step = self.params["batch_size"]
        for start in range(0, len(X), step):
            part = X.take(slice(start, start + step))
            cand = self.candidates(part)
            score = self.booster_.predict(self._features(part, cand)).reshape(cand.shape)   # (B, K)
            score = score / (score.sum(axis=1, keepdims=True) + 1e-12)
            np.put_along_axis(out[start:start + step], cand, score.astype(np.float32), axis=1)
        return out

    def save(self, path):
        self._save_booster(path, {"n_classes_": self.n_classes_, "prior_counts_": self.prior_counts_.tolist(),
                                  "train_recall_": self.train_recall_})

    def _restore(self, path, learned):
        self.n_classes_ = learned["n_classes_"]
        self.prior_counts_ = np.asarray(learned["prior_counts_"], np.float32)
        self.train_recall_ = learned["train_recall_"]
        self._load_booster(path)


STACKERS = {cls.kind: cls for cls in (AverageStacker, LogisticStacker, LGBMStacker, RerankStacker)}


def make_stacker(kind, **params):
    if kind not in STACKERS:
        raise ValueError(f"unknown stacker '{kind}'; choose one of {', '.join(STACKERS)}")
    return STACKERS[kind](**params)


def load_stacker(path):
    path = Path(path)
    try:
        with open(path / "stacker.json", encoding="utf-8") as fh:
            meta = json.load(fh)
    except OSError as err:
        raise ValueError(f"{path}/stacker.json: cannot read the fitted stacker: {err}") from err
    stacker = make_stacker(meta["kind"], **meta["params"])
    stacker._restore(path, meta["learned"])
    return stacker
