"""The challenge metric: mean of micro- and macro-F1 at the fine (level 2) and coarse (level 1) levels."""
import numpy as np
from sklearn.metrics import f1_score

METRIC_KEYS = ("mean", "l2_micro", "l2_macro", "l1_micro", "l1_macro")


def challenge_metric(fine_true, fine_pred, fine_to_coarse, truth_classes_only=False):
    """fine_true, fine_pred (N,) fine class indices; fine_to_coarse (C,) -> dict of the four F1s and mean.

    Macro-F1 averages over the labels present in truth or prediction, as sklearn does by default (the
    challenge's score); with truth_classes_only over the labels of the truth alone, so a prediction of a
    class the items lack costs no class of F1 0 (a diagnostic: bench/semi.py).
    """
    fine_true, fine_pred = np.asarray(fine_true), np.asarray(fine_pred)
    fine_to_coarse = np.asarray(fine_to_coarse)
    coarse_true, coarse_pred = fine_to_coarse[fine_true], fine_to_coarse[fine_pred]
    fine_labels, coarse_labels = (np.unique(fine_true), np.unique(coarse_true)) if truth_classes_only else (None, None)
    parts = {
        "l2_micro": f1_score(fine_true, fine_pred, average="micro"),
        "l2_macro": f1_score(fine_true, fine_pred, average="macro", labels=fine_labels),
        "l1_micro": f1_score(coarse_true, coarse_pred, average="micro"),
        "l1_macro": f1_score(coarse_true, coarse_pred, average="macro", labels=coarse_labels),
    }
    parts = {k: float(v) for k, v in parts.items()}
    parts["mean"] = float(np.mean(list(parts.values())))
    return {k: parts[k] for k in METRIC_KEYS}


def metric_from_proba(fine_true, proba, fine_to_coarse):
    """Same, predicting the arg-max fine class of proba (N, C)."""
    return challenge_metric(fine_true, np.asarray(proba).argmax(axis=1), fine_to_coarse)


class PairedBootstrap:
    """The challenge metric of several predictions of the same items on the same seeded resamples.

    Resample b draws N items with replacement (the same draws for every prediction, so differences are
    paired); its mean-F1 equals challenge_metric on the drawn rows (macro over the labels present in that
    resample's truth or prediction). Resamples are drawn in chunks of `chunk` and counted with bincount,
    so memory is O(chunk x N) whatever the number of resamples.
    """

    def __init__(self, true, fine_to_coarse, n_resamples=1000, seed=0, chunk=50):
        self.true, self.f2c = np.asarray(true), np.asarray(fine_to_coarse)
        self.n_resamples, self.seed, self.chunk = n_resamples, seed, chunk

    def draws(self):
        """Yields (b, N) index arrays; the same sequence on every call."""
        rng, left, n = np.random.default_rng(self.seed), self.n_resamples, len(self.true)
        while left > 0:
            b = min(left, self.chunk)
            yield rng.integers(0, n, size=(b, n))
            left -= b

    def means(self, pred):
        """(B,) mean-F1 of the fine predictions `pred` (N,) on each resample."""
        pred = np.asarray(pred)
        if pred.shape != self.true.shape:
            raise ValueError(f"predictions of shape {pred.shape} for {self.true.shape} true labels")
        n_fine, n_coarse = len(self.f2c), int(self.f2c.max()) + 1
        out = []
        for rows in self.draws():
            for d in rows:
                t, p = self.true[d], pred[d]
                out.append((sum(_micro_macro(t, p, n_fine)) +
                            sum(_micro_macro(self.f2c[t], self.f2c[p], n_coarse))) / 4)
        return np.array(out)


def _micro_macro(true, pred, n_labels):
    """(micro-F1, macro-F1) of one-label predictions from per-class counts; macro over present labels."""
    hit = true == pred
    tp = np.bincount(true[hit], minlength=n_labels)
    support = np.bincount(true, minlength=n_labels) + np.bincount(pred, minlength=n_labels)   # n_true + n_pred
    present = support > 0
    return hit.mean(), float((2 * tp[present] / support[present]).mean())


def band(samples, level=0.90):
    """[low, high]: the central `level` interval of bootstrap samples."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]
