"""Label shift of a predicted split: its class priors estimated from the stacker's own probabilities, and
the probabilities adjusted to them (Saerens, Latinne and Decaestecker 2002), after calibrating them
(bias-corrected temperature scaling, Alexandari et al. 2020: EM on calibrated outputs).

    Calibrator      fit on the stacker's out-of-fold probabilities (N, C) and labels: softmax(a log p + b)
    em_priors       EM on a split's calibrated probabilities: priors (C,) and the adjusted probabilities
    ShiftAdapter    the two, plus the rule that decides whether a split is shifted at all: EM run on each
                    outer fold's OOF rows (no shift: same distribution as the training folds) gives the
                    estimator's own noise, the total variation of its priors from the training ones, scaled
                    to the split's size by sqrt(n_fold / n_split); a split whose estimated priors are
                    further than the largest of those is adjusted, any other is left as it is.
"""
import numpy as np
from scipy.optimize import minimize


EPS = 1e-12


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Calibrator:
    """Bias-corrected temperature scaling: p -> softmax(a * log p + b), a > 0 and b (C,) fitted by the
    negative log-likelihood of the labels."""

    def fit(self, proba, y):
        logp = np.log(np.asarray(proba, np.float64) + EPS)                # (N, C)
        n, c = logp.shape
        onehot = np.zeros((n, c))
        onehot[np.arange(n), y] = 1

        def nll(theta):
            a, b = theta[0], theta[1:]
            p = softmax(a * logp + b)
            loss = -np.mean(np.log(p[np.arange(n), y] + EPS)) + 1e-4 * (b @ b)
            diff = (p - onehot) / n                                       # (N, C)
            return loss, np.r_[np.sum(diff * logp), diff.sum(0) + 2e-4 * b]

        theta = minimize(nll, np.r_[1.0, np.zeros(c)], jac=True, method="L-BFGS-B",
                         bounds=[(1e-3, 100.0)] + [(None, None)] * c).x
        self.a_, self.b_ = float(theta[0]), theta[1:]
        return self

    def transform(self, proba):
        return softmax(self.a_ * np.log(np.asarray(proba, np.float64) + EPS) + self.b_)


def em_priors(proba, train_priors, max_iter=200, tol=1e-6):
    """Saerens et al.'s EM. proba (N, C) calibrated posteriors under train_priors (C,) -> (priors (C,),
    adjusted posteriors (N, C), iterations). A class with training prior 0 (no labelled item) keeps prior and
    posterior 0: its calibrated probability is never exactly 0, and the ratio prior / training prior would
    otherwise let it grow without bound until it holds every item."""
    train_priors = np.asarray(train_priors, np.float64)
    seen = train_priors > 0                                               # (C,)
    proba = np.asarray(proba, np.float64) * seen
    proba /= np.maximum(proba.sum(axis=1, keepdims=True), EPS)
    base = np.where(seen, train_priors, 1.0)
    priors = train_priors.copy()
    for it in range(1, max_iter + 1):
        adjusted = proba * (priors / base)
        adjusted /= np.maximum(adjusted.sum(axis=1, keepdims=True), EPS)
        new = adjusted.mean(axis=0)
        if np.abs(new - priors).max() < tol:
            return new, adjusted, it
        priors = new
    return priors, adjusted, max_iter


def total_variation(p, q):
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


class ShiftAdapter:
    """Calibrate, estimate a split's priors, adjust when the shift is beyond the estimator's noise."""

    def fit(self, oof, y, fold, n_classes):
        """oof (N, C): the stacker's out-of-fold probabilities of the labelled videos y (N,) over fold (N,)."""
        self.calibrator_ = Calibrator().fit(oof, y)
        self.train_priors_ = np.bincount(y, minlength=n_classes) / len(y)
        calibrated = self.calibrator_.transform(oof)
        self.fold_noise_ = []
        for k in np.unique(fold):
            held = fold == k
            priors, _, _ = em_priors(calibrated[held], self.train_priors_)
            self.fold_noise_.append({"fold": int(k), "n": int(held.sum()),
                                     "tv": total_variation(priors, self.train_priors_)})
        return self

    def noise_bar(self, n_split):
        """The largest no-shift TV of the folds, scaled to a split of n_split videos."""
        return max(f["tv"] * np.sqrt(f["n"] / n_split) for f in self.fold_noise_)

    def adapt(self, proba, force=False):
        """proba (N, C) of a predicted split -> (class weights (C,): estimated priors over training priors
        when the split is shifted (or `force`), else ones; the calibrated probabilities, EM-adjusted likewise
        (N, C); the record: priors, TV, the noise bar, applied)."""
        calibrated = self.calibrator_.transform(proba)
        priors, adjusted, iters = em_priors(calibrated, self.train_priors_)
        tv, bar = total_variation(priors, self.train_priors_), self.noise_bar(len(proba))
        applied = bool(tv > bar or force)
        record = {"applied": applied, "tv_from_training_priors": tv, "noise_bar": float(bar),
                  "em_iterations": iters, "estimated_priors": priors.tolist(),
                  "expected_counts": (priors * len(proba)).tolist()}
        if not applied:
            return np.ones(len(priors)), calibrated, record
        return priors / np.maximum(self.train_priors_, EPS), adjusted, record

    def to_dict(self):
        """The fitted state, JSON-ready (stack.json's `label_shift_adapter`)."""
        return {"a": self.calibrator_.a_, "b": self.calibrator_.b_.tolist(),
                "train_priors": self.train_priors_.tolist(), "fold_noise": self.fold_noise_}

    @classmethod
    def from_dict(cls, state, where="label_shift_adapter"):
        missing = [k for k in ("a", "b", "train_priors", "fold_noise") if k not in state]
        if missing:
            raise ValueError(f"{where}: field '{missing[0]}' is missing")
        out = cls()
        out.calibrator_ = Calibrator()
        out.calibrator_.a_, out.calibrator_.b_ = float(state["a"]), np.asarray(state["b"], np.float64)
        out.train_priors_ = np.asarray(state["train_priors"], np.float64)
        out.fold_noise_ = state["fold_noise"]
        return out
