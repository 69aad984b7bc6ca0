"""`logreg`: multinomial logistic regression on every model's probabilities and the signals, standardised.

Probabilities rather than log-probabilities, and C = 0.1: both scored better out-of-fold on a
2,048-video fashion run (0.747 against 0.725 for log-probabilities). One BLAS thread: lbfgs with
more threads ran ~100x slower on the shared 2-core machine.
"""
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from stacking.stackers.base import Stacker, load_npz, param, save_npz


@dataclass
class LogisticParams:
    C: float = param(0.1, "inverse regularisation strength")
    max_iter: int = param(300, "lbfgs iterations")
    seed: int = param(0, "random state (from --seed)")


def _features(X):
    """(N, M*C + S): [p_1 .. p_M, signals]."""
    m, n, c = X.probas.shape
    return np.concatenate([X.probas.transpose(1, 0, 2).reshape(n, m * c), X.signals], axis=1)


class LogisticStacker(Stacker):
    kind = "logreg"
    summary = "multinomial logistic regression on the probabilities and signals"
    Params = LogisticParams

    def fit(self, X, y):
        from sklearn.linear_model import LogisticRegression      # imported on use: `run.py --help` stays fast
        features = _features(X)                                           # (N, M*C + S)
        self.mean_, self.scale_ = features.mean(axis=0), features.std(axis=0) + 1e-6
        self.model_ = LogisticRegression(C=self.params.C, max_iter=self.params.max_iter,
                                         random_state=self.params.seed)
        with threadpool_limits(1):
            self.model_.fit((features - self.mean_) / self.scale_, y)
        self.n_classes_ = X.n_classes
        return self

    def predict_proba(self, X):
        z = (_features(X) - self.mean_) / self.scale_
        out = np.zeros((len(X), self.n_classes_), np.float32)
        out[:, self.model_.classes_] = self.model_.predict_proba(z)   # classes unseen in fit stay 0
        return out

    def _save_arrays(self, path):
        save_npz(path / "logreg.npz", mean_=self.mean_, scale_=self.scale_, coef_=self.model_.coef_,
                 intercept_=self.model_.intercept_, classes_=self.model_.classes_)

    def restore(self, path, learned):
        from sklearn.linear_model import LogisticRegression
        super().restore(path, learned)
        arrays = load_npz(path / "logreg.npz", ("mean_", "scale_", "coef_", "intercept_", "classes_"))
        self.mean_, self.scale_ = arrays["mean_"], arrays["scale_"]
        self.model_ = LogisticRegression()
        self.model_.coef_, self.model_.intercept_ = arrays["coef_"], arrays["intercept_"]
        self.model_.classes_ = arrays["classes_"]
