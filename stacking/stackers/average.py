"""`average`: the plain mean of the base models' probabilities, the baseline every stack must beat."""
from stacking.stackers.base import Stacker


class AverageStacker(Stacker):
    kind = "average"
    summary = "the plain mean of the base models (the baseline)"

    def fit(self, X, y):
        self.n_classes_ = X.n_classes
        return self

    def predict_proba(self, X):
        return X.probas.mean(axis=0)                                     # (N, C)
