"""`rerank`: a binary LightGBM scoring each video's top-k candidate classes of the base models' average.

The cost does not grow with C trees per round, as the multiclass `lgbm` does. Features of each
(video, candidate) row: each model's probability of the candidate, its rank and ratio to that
model's top-1 (and, with fine_to_coarse, the model's mass on the candidate's coarse class), the
average's probability, the candidate's position, its training count (log) and id, and the signals.
"""
from dataclasses import dataclass

import numpy as np

from stacking.stackers import booster
from stacking.stackers.base import Stacker, param

EPS = 1e-6


@dataclass
class RerankParams:
    top_k: int = param(10, "candidate classes per video (the average's top-k)")
    n_rounds: int = param(300, "boosting rounds")
    learning_rate: float = param(0.05, "shrinkage per round")
    num_leaves: int = param(31, "leaves per tree")
    min_data_in_leaf: int = param(40, "fewest rows in a leaf")
    feature_fraction: float = param(0.8, "share of features drawn per tree")
    lambda_l2: float = param(1.0, "L2 penalty on leaf values")
    max_bin: int = param(255, "histogram bins per feature")
    threads: int = param(1, "LightGBM threads (from --threads)")
    seed: int = param(0, "random seed (from --seed)")
    batch_size: int = param(20000, "videos per prediction batch (bounds memory)")
    fine_to_coarse: list = param(None, "(C,) coarse class of each fine class (from the run)")


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


class RerankStacker(Stacker):
    kind = "rerank"
    summary = "a binary LightGBM re-ranking each video's top-k classes (the default)"
    Params = RerankParams

    def candidates(self, X):
        """(N, K) class indices: the top-k of the average, best first."""
        k = min(self.top_k, X.n_classes)
        mean = X.probas.mean(axis=0)                                     # (N, C)
        top = np.argpartition(-mean, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(mean, top, axis=1), axis=1)
        return np.take_along_axis(top, order, axis=1)

    def _features(self, X, cand):
        """(N*K, F) rows for (video, candidate) pairs; the last column is the class id (categorical)."""
        n, k = cand.shape
        f2c = self.fine_to_coarse
        cols = []
        for proba in X.probas:                                           # proba (N, C)
            p = np.take_along_axis(proba, cand, axis=1)                  # (N, K)
            rank = _ranks(proba, p)                                      # (N, K) 0 = that model's top-1
            cols += [p, rank, p / (proba.max(axis=1, keepdims=True) + EPS)]
            if f2c is not None:
                cols.append(_coarse_mass(proba, np.asarray(f2c), cand))
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
        self.booster_ = booster.train(booster.lgb_params("binary", self), features, target,
                                      self.n_rounds, categorical=[features.shape[1] - 1])
        return self

    def predict_proba(self, X):
        """(N, C): candidates' scores normalised per video; classes outside the top-k get 0."""
        out = np.zeros((len(X), self.n_classes_), np.float32)
        step = self.batch_size
        for start in range(0, len(X), step):
            part = X.take(slice(start, start + step))
            cand = self.candidates(part)
            score = self.booster_.predict(self._features(part, cand)).reshape(cand.shape)   # (B, K)
            score = score / (score.sum(axis=1, keepdims=True) + 1e-12)
            np.put_along_axis(out[start:start + step], cand, score.astype(np.float32), axis=1)
        return out

    def report(self, X, y):
        """Recall@k of the candidates: on the data of the final fit, and of the average's top-k on X."""
        return {"rerank_train_recall_at_k": self.train_recall_,
                "rerank_oof_recall_at_k": float((self.candidates(X) == y[:, None]).any(axis=1).mean())}

    def learned(self):
        return {"n_classes_": self.n_classes_, "prior_counts_": self.prior_counts_.tolist(),
                "train_recall_": self.train_recall_}

    def _save_arrays(self, path):
        booster.save_booster(self.booster_, path)

    def restore(self, path, learned):
        super().restore(path, learned)
        self.prior_counts_ = np.asarray(learned["prior_counts_"], np.float32)
        self.train_recall_ = learned["train_recall_"]
        self.booster_ = booster.load_booster(path)
