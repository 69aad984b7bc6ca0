"""The challenge metric: mean of micro- and macro-F1 at the fine (level 2) and coarse (level 1) levels."""
import numpy as np
from sklearn.metrics import f1_score

METRIC_KEYS = ("mean", "l2_micro", "l2_macro", "l1_micro", "l1_macro")


def challenge_metric(fine_true, fine_pred, fine_to_coarse):
    """fine_true, fine_pred (N,) fine class indices; fine_to_coarse (C,) -> dict of the four F1s and mean.

    Macro-F1 averages over the labels present in truth or prediction, as sklearn does by default.
    """
    fine_true, fine_pred = np.asarray(fine_true), np.asarray(fine_pred)
    fine_to_coarse = np.asarray(fine_to_coarse)
    coarse_true, coarse_pred = fine_to_coarse[fine_true], fine_to_coarse[fine_pred]
    parts = {
        "l2_micro": f1_score(fine_true, fine_pred, average="micro"),
        "l2_macro": f1_score(fine_true, fine_pred, average="macro"),
        "l1_micro": f1_score(coarse_true, coarse_pred, average="micro"),
        "l1_macro": f1_score(coarse_true, coarse_pred, average="macro"),
    }
    parts = {k: float(v) for k, v in parts.items()}
    parts["mean"] = float(np.mean(list(parts.values())))
    return {k: parts[k] for k in METRIC_KEYS}


def metric_from_proba(fine_true, proba, fine_to_coarse):
    """Same, predicting the arg-max fine class of proba (N, C)."""
    return challenge_metric(fine_true, np.asarray(proba).argmax(axis=1), fine_to_coarse)
