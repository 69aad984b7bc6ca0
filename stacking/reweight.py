"""Long-tail reweighting: scale each class's probability by a weight from its training count n_c.

Two families (n_c floored at 1 so a class unseen in training gets the largest weight, not infinity):
    power:    w_c = n_c ** -tau          (tau = 0 leaves the prediction unchanged)
    inverse:  w_c = a / n_c + 1          (the 2022 challenge teams' form; a = 0 leaves it unchanged)
`fit` picks the family and parameter that maximise the challenge metric on the predictions it is
given, so give it predictions it will not be scored on (stacking/pipeline.py tunes it inside the
stacker's cross-validation).
"""
import numpy as np

from core.records import read_json, write_json


TAUS = tuple(np.round(np.arange(0.0, 1.51, 0.05), 2))
ALPHAS = (0.0, 0.1, 0.3, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
KINDS = ("power", "inverse")


class ReweightError(ValueError):
    """An unknown reweighting, or a saved one that cannot be read."""


def challenge_mean(y, pred, fine_to_coarse, n_classes):
    """challenge_metric(...)["mean"] from confusion counts: the same numbers, fast enough to scan a grid.

    Single-label micro-F1 is accuracy; macro-F1 averages 2tp / (2tp + fp + fn) over the labels present
    in truth or prediction (sklearn's default, as in neural/metrics.py).
    """
    parts = []
    for truth, guess, n in ((y, pred, n_classes),
                            (fine_to_coarse[y], fine_to_coarse[pred], int(fine_to_coarse.max()) + 1)):
        tp = np.bincount(truth[truth == guess], minlength=n)
        n_true, n_pred = np.bincount(truth, minlength=n), np.bincount(guess, minlength=n)
        present = (n_true + n_pred) > 0
        parts += [tp.sum() / len(truth), np.mean(2 * tp[present] / (n_true + n_pred)[present])]
    return float(np.mean(parts))


def class_weights(kind, param, class_counts):
    """(C,) weights for class counts (C,)."""
    n = np.maximum(np.asarray(class_counts, np.float64), 1.0)
    if kind == "power":
        return n ** -float(param)
    if kind == "inverse":
        return float(param) / n + 1.0
    raise ReweightError(f"unknown reweighting '{kind}'; choose one of {', '.join(KINDS)}")


class PriorReweighter:
    def __init__(self, kind="auto", taus=TAUS, alphas=ALPHAS):
        if kind not in KINDS + ("auto",):
            raise ReweightError(f"unknown reweighting '{kind}'; choose auto or one of {', '.join(KINDS)}")
        self.kind, self.taus, self.alphas = kind, tuple(taus), tuple(alphas)

    def _candidates(self):
        kinds = KINDS if self.kind == "auto" else (self.kind,)
        return [(k, p) for k in kinds for p in (self.taus if k == "power" else self.alphas)]

    def fit(self, proba, y, class_counts, fine_to_coarse):
        """proba (N, C), y (N,), class_counts (C,) training counts -> self with kind_, param_, weights_."""
        self.class_counts_ = np.asarray(class_counts, np.float64)
        y, f2c = np.asarray(y), np.asarray(fine_to_coarse)
        self.curve_ = []
        for kind, param in self._candidates():
            pred = (proba * class_weights(kind, param, class_counts)).argmax(axis=1)
            self.curve_.append((kind, float(param), challenge_mean(y, pred, f2c, proba.shape[1])))
        # the first best wins: candidates start with the identity, so ties keep the prediction as is
        best = max(range(len(self.curve_)), key=lambda i: (self.curve_[i][2], -i))
        self.kind_, self.param_, self.score_ = self.curve_[best]
        self.weights_ = class_weights(self.kind_, self.param_, self.class_counts_)
        return self

    def transform(self, proba):
        """(N, C) -> (N, C) reweighted and renormalised per row."""
        out = np.asarray(proba, np.float64) * self.weights_
        return (out / np.maximum(out.sum(axis=1, keepdims=True), 1e-300)).astype(np.float32)

    def save(self, path):
        write_json(path, {"kind": self.kind, "kind_": self.kind_, "param_": self.param_, "score_": self.score_,
                          "class_counts_": self.class_counts_.tolist(), "weights_": self.weights_.tolist(),
                          "curve_": self.curve_})

    @classmethod
    def load(cls, path):
        state = read_json(path, error=ReweightError, hint="no fitted reweighting here")
        missing = [k for k in ("kind", "kind_", "param_", "score_", "class_counts_", "weights_", "curve_")
                   if k not in state]
        if missing:
            raise ReweightError(f"{path}: field '{missing[0]}' is missing")
        out = cls(state["kind"])
        out.kind_, out.param_, out.score_ = state["kind_"], state["param_"], state["score_"]
        out.class_counts_ = np.asarray(state["class_counts_"], np.float64)
        out.weights_ = np.asarray(state["weights_"], np.float64)
        out.curve_ = [tuple(c) for c in state["curve_"]]
        return out
