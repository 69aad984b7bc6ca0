"""`logreg`: multinomial logistic regression on every model's probabilities and the signals, standardised
(scikit-learn's StandardScaler then LogisticRegression, one Pipeline).

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


def _pipeline(**logistic):
    """An unfitted StandardScaler -> LogisticRegression(**logistic) pipeline."""
    from sklearn.linear_model import LogisticRegression      # imported on use: `run.py` does not need them
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(**logistic))


class LogisticStacker(Stacker):
    kind = "logreg"
    summary = "multinomial logistic regression on the probabilities and signals"
    Params = LogisticParams

    def fit(self, X, y):
        self.model_ = _pipeline(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        with threadpool_limits(1):
            self.model_.fit(_features(X), y)                     # features (N, M*C + S)
        self.n_classes_ = X.n_classes
        return self

    def predict_proba(self, X):
        out = np.zeros((len(X), self.n_classes_), np.float32)
        out[:, self.model_.classes_] = self.model_.predict_proba(_features(X))   # classes unseen in fit stay 0
        return out

    def _save_arrays(self, path):
        scaler, logistic = self.model_[0], self.model_[-1]
        save_npz(path / "logreg.npz", mean_=scaler.mean_, scale_=scaler.scale_, coef_=logistic.coef_,
                 intercept_=logistic.intercept_, classes_=logistic.classes_)

    def restore(self, path, learned):
        """The pipeline from logreg.npz's arrays (no pickle). A stacker saved before the pipeline kept its own
        mean_ and scale_ (standard deviation + 1e-6): the scaler divides by that scale_, as it did."""
        super().restore(path, learned)
        arrays = load_npz(path / "logreg.npz", ("mean_", "scale_", "coef_", "intercept_", "classes_"))
        self.model_ = _pipeline()
        scaler, logistic = self.model_[0], self.model_[-1]
        scaler.mean_, scaler.scale_ = arrays["mean_"], arrays["scale_"]
        scaler.var_, scaler.n_features_in_ = arrays["scale_"] ** 2, len(arrays["mean_"])
        logistic.coef_, logistic.intercept_ = arrays["coef_"], arrays["intercept_"]
        logistic.classes_ = arrays["classes_"]
