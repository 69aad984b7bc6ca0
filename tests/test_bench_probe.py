"""bench/heldout.py's linear_probe, the one C-grid / fold / refit loop of the benches' logistic-regression
probes (heldout's baseline): small random data, checked against sklearn fitted by hand."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from bench.heldout import linear_probe
from neural.metrics import metric_from_proba

N_CLASSES = 4
FINE_TO_COARSE = np.array([0, 0, 1, 1])
GRID = [100.0, 0.001, 0.3]          # the best C is not the last one


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(N_CLASSES, 6))
    y, y_test = rng.integers(0, N_CLASSES, 240), rng.integers(0, N_CLASSES, 40)
    spread = rng.uniform(0.1, 10, 6)                               # features on unlike scales
    x = centers[y] + rng.normal(scale=2.0, size=(240, 6)) * spread                # (N, D)
    x_test = centers[y_test] + rng.normal(scale=2.0, size=(40, 6)) * spread       # (N_test, D)
    fold = rng.permutation(np.arange(240) % 3)                                     # (N,) 3 folds
    return x, y, x_test, fold


def _proba(x, y, x_out, C, scale):
    steps = [StandardScaler()] if scale == "standard" else []
    with threadpool_limits(1):                  # as the probe fits
        lr = make_pipeline(*steps, LogisticRegression(C=C, max_iter=500)).fit(x, y)
    return lr.predict_proba(x_out).astype(np.float32)


@pytest.mark.parametrize("scale", ["standard", "raw"])
def test_the_probe_picks_the_c_with_the_best_oof_score_and_refits_on_every_row(data, scale):
    x, y, x_test, fold = data
    oof, test, C, scores = linear_probe(x, y, x_test, fold, N_CLASSES, FINE_TO_COARSE, GRID, scale)

    assert list(scores) == [str(c) for c in GRID]
    assert C == max(GRID, key=lambda c: scores[str(c)]) and C != GRID[-1]
    for k in range(3):                          # each OOF row from the model that did not see its fold
        np.testing.assert_array_equal(oof[fold == k], _proba(x[fold != k], y[fold != k], x[fold == k], C, scale))
    assert scores[str(C)] == metric_from_proba(y, oof, FINE_TO_COARSE)["mean"]
    np.testing.assert_array_equal(test, _proba(x, y, x_test, C, scale))
