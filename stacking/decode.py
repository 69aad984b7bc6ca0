"""Metric-aware decoding of a predicted split: labels chosen for the expected challenge metric, not item by item.

The challenge's macro-F1 runs over the classes present in the truth or in the predictions, so one item put
into a class the split lacks adds a class with F1 0 (at 74 classes about 0.01 of mean-F1 by itself).
Per-item arg-max ignores that cliff. Here every class that the arg-max opens with at most `max_items` items
and whose expected count in the split (the sum of its calibrated probabilities) is below `max_expected` is
a candidate, rarest first: its items are moved to their next-best class among the classes not in question,
and the move is kept when it raises the expected challenge metric. The expectation is over truths drawn
from the calibrated (label-shift adjusted) probabilities, item by item, the same draws for both choices.
"""
import numpy as np

from stacking.reweight import challenge_mean


def sample_truths(proba, n_samples, seed):
    """(S, N) labels drawn from proba (N, C), each row a categorical draw per item."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.asarray(proba, np.float64), axis=1)                # (N, C)
    cdf /= cdf[:, -1:]
    out = np.empty((n_samples, len(cdf)), np.int64)
    for s in range(n_samples):
        u = rng.random(len(cdf))[:, None]
        out[s] = np.minimum((cdf < u).sum(axis=1), cdf.shape[1] - 1)
    return out


def expected_metric(truths, pred, fine_to_coarse, n_classes):
    """(S,) challenge mean-F1 of pred (N,) against each drawn truth (S, N)."""
    return np.array([challenge_mean(t, pred, fine_to_coarse, n_classes) for t in truths])


def decode(scores, proba, fine_to_coarse, max_items=2, max_expected=1.0, n_samples=200, seed=0):
    """scores (N, C): the decision scores (arg-max gives today's labels; also ranks where a moved item goes);
    proba (N, C): calibrated probabilities of the split. -> (pred (N,), decisions [{class, items, expected_count,
    gain, moved}])."""
    f2c, n_classes = np.asarray(fine_to_coarse), scores.shape[1]
    pred = scores.argmax(axis=1)
    expected = np.asarray(proba, np.float64).sum(axis=0)                  # (C,) expected count per class
    counts = np.bincount(pred, minlength=n_classes)
    candidates = [c for c in np.argsort(expected, kind="stable")
                  if 0 < counts[c] <= max_items and expected[c] < max_expected]
    if not candidates:
        return pred, []
    truths = sample_truths(proba, n_samples, seed)
    current = expected_metric(truths, pred, f2c, n_classes)
    blocked = np.zeros(n_classes, bool)
    blocked[candidates] = True
    decisions = []
    for c in candidates:
        items = np.flatnonzero(pred == c)
        masked = np.where(blocked, -np.inf, scores[items])                  # (n, C)
        if not np.isfinite(masked).any(axis=1).all():
            continue
        trial = pred.copy()
        trial[items] = masked.argmax(axis=1)
        moved = expected_metric(truths, trial, f2c, n_classes)
        gain = float(np.mean(moved - current))
        decision = {"class": int(c), "items": int(len(items)), "expected_count": float(expected[c]),
                    "gain_if_moved": gain, "moved": gain > 0}
        if gain > 0:
            pred, current = trial, moved
        else:
            blocked[c] = False                  # it stays open: items of later candidates may go there
        decisions.append(decision)
    return pred, decisions
