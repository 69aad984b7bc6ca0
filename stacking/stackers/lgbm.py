"""`lgbm`: one multiclass LightGBM on every model's probabilities and the signals (C trees per round).

Only the classes seen in training (seen_classes_) are modelled (their probability columns are the
features): a class map of 200 with 74 classes present grows 74 trees a round, not 200.
"""
from dataclasses import dataclass

import numpy as np

from stacking.stackers import booster
from stacking.stackers.base import Stacker, param


@dataclass
class LGBMParams:
    n_rounds: int = param(100, "boosting rounds")
    learning_rate: float = param(0.1, "shrinkage per round")
    num_leaves: int = param(15, "leaves per tree")
    min_data_in_leaf: int = param(20, "fewest videos in a leaf")
    feature_fraction: float = param(0.5, "share of features drawn per tree")
    lambda_l2: float = param(1.0, "L2 penalty on leaf values")
    max_bin: int = param(63, "histogram bins per feature")
    threads: int = param(1, "LightGBM threads (from --threads)")
    seed: int = param(0, "random seed (from --seed)")


class LGBMStacker(Stacker):
    kind = "lgbm"
    summary = "one multiclass LightGBM (a tree per class per round)"
    Params = LGBMParams

    def _features(self, X):
        """(N, M*C_seen + S): the probabilities of the classes seen in training, then the signals."""
        m, n, _ = X.probas.shape
        probas = X.probas[:, :, self.seen_classes_].transpose(1, 0, 2).reshape(n, m * len(self.seen_classes_))
        return np.concatenate([probas, X.signals], axis=1)

    def fit(self, X, y):
        self.n_classes_, self.seen_classes_ = X.n_classes, np.unique(y)
        target = np.searchsorted(self.seen_classes_, y)
        params = booster.lgb_params("multiclass", self, {"num_class": len(self.seen_classes_)})
        self.booster_ = booster.train(params, self._features(X), target, self.n_rounds)
        return self

    def predict_proba(self, X):
        out = np.zeros((len(X), self.n_classes_), np.float32)
        out[:, self.seen_classes_] = self.booster_.predict(self._features(X)).reshape(len(X), -1)
        return out

    def learned(self):         # "classes_": the key saved stackers have (classes_ is now every column's class)
        return {"n_classes_": self.n_classes_, "classes_": self.seen_classes_.tolist()}

    def _save_arrays(self, path):
        booster.save_booster(self.booster_, path)

    def restore(self, path, learned):
        super().restore(path, learned)
        self.seen_classes_ = np.asarray(learned["classes_"], np.int64)
        self.booster_ = booster.load_booster(path)
