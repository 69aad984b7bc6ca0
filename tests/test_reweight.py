"""Long-tail reweighting: the weight formulas, the choice of parameter, and the low-quartile report."""
import numpy as np
import pytest

from neural.metrics import challenge_metric, metric_from_proba
from stacking.pipeline import low_quartile_f1
from stacking.reweight import PriorReweighter, challenge_mean, class_weights


def long_tail(n=3000, n_classes=12, head_bias=6.0, seed=0):
    """Labels on a long tail and probabilities from a model that over-predicts the head classes."""
    rng = np.random.default_rng(seed)
    prior = 1.0 / np.arange(1, n_classes + 1) ** 1.2
    prior /= prior.sum()
    y = rng.choice(n_classes, size=n, p=prior)
    counts = np.bincount(y, minlength=n_classes)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.8
    logits += head_bias * np.log(np.maximum(counts, 1))[None, :] / np.log(counts.max())
    proba = np.exp(logits)
    return proba / proba.sum(axis=1, keepdims=True), y, counts


F2C = np.arange(12) // 3


def test_fast_metric_equals_the_challenge_metric():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=500)                     # classes 10, 11 never true
    pred = np.where(rng.random(500) < 0.6, y, rng.integers(0, 12, size=500))
    assert challenge_mean(y, pred, F2C, 12) == pytest.approx(challenge_metric(y, pred, F2C)["mean"], abs=1e-12)


def test_weight_formulas():
    counts = np.array([100, 10, 1, 0])
    assert np.allclose(class_weights("power", 0.5, counts), [0.1, 10 ** -0.5, 1.0, 1.0])   # n floored at 1
    assert np.allclose(class_weights("inverse", 20.0, counts), [1.2, 3.0, 21.0, 21.0])
    assert np.allclose(class_weights("power", 0.0, counts), 1.0)
    with pytest.raises(ValueError, match="unknown reweighting 'log'"):
        class_weights("log", 1.0, counts)


@pytest.mark.parametrize("kind", ["power", "inverse", "auto"])
def test_fit_counters_a_head_bias_and_generalises(kind):
    proba, y, counts = long_tail(seed=0)
    rw = PriorReweighter(kind).fit(proba, y, counts, F2C)
    assert rw.param_ > 0                                   # a head bias calls for a real reweighting
    before = metric_from_proba(y, proba, F2C)["mean"]
    assert rw.score_ == pytest.approx(metric_from_proba(y, rw.transform(proba), F2C)["mean"])
    assert rw.score_ > before + 0.02
    # the parameter carries over to fresh videos from the same model
    proba2, y2, _ = long_tail(seed=1)
    assert metric_from_proba(y2, rw.transform(proba2), F2C)["mean"] > metric_from_proba(y2, proba2, F2C)["mean"]
    assert np.allclose(rw.transform(proba).sum(axis=1), 1.0, atol=1e-5)


def test_unbiased_predictions_keep_the_identity_when_nothing_helps():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(12), 50)                      # balanced: every weight family is a no-op
    proba = rng.dirichlet(np.ones(12), size=len(y))
    proba[np.arange(len(y)), y] += 0.3
    rw = PriorReweighter("auto").fit(proba, y, np.bincount(y), F2C)
    assert (rw.kind_, rw.param_) == ("power", 0.0)
    assert np.array_equal(rw.transform(proba).argmax(1), proba.argmax(1))


def test_save_load_round_trip(tmp_path):
    proba, y, counts = long_tail()
    rw = PriorReweighter("auto").fit(proba, y, counts, F2C)
    rw.save(tmp_path / "rw.json")
    loaded = PriorReweighter.load(tmp_path / "rw.json")
    assert (loaded.kind_, loaded.param_) == (rw.kind_, rw.param_)
    assert np.allclose(loaded.transform(proba), rw.transform(proba))


def test_low_quartile_macro_f1_counts_only_the_rarest_classes():
    counts = np.array([100, 50, 20, 4, 2, 0])             # quartile cut of present counts = 4
    y = np.array([0, 0, 1, 2, 3, 3, 4, 4])
    before = np.array([0, 0, 1, 2, 0, 0, 0, 0])            # the two rare classes never predicted
    after = np.array([0, 0, 1, 2, 3, 3, 4, 0])             # class 3 perfect, class 4 half right
    report = low_quartile_f1(y, before, after, counts)
    assert report["n_classes"] == 2 and report["max_count"] == 4
    assert report["macro_f1_before"] == 0.0
    assert report["macro_f1_after"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert report["change"] == pytest.approx(report["macro_f1_after"])
