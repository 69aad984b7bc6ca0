"""Label shift (stacking/labelshift.py) and metric-aware decoding (stacking/decode.py): a planted prior shift
is recovered and the adjusted labels gain; a split without shift is left alone; the decoder makes the choice
that an exact expectation says is best."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from neural.metrics import challenge_metric
from stacking.decode import decode
from stacking.labelshift import Calibrator, ShiftAdapter, em_priors, softmax

MEANS = np.array([[0, 0], [2, 0], [0, 2], [2, 2], [1, 1]], float)   # 5 overlapping classes in 2-D
TRAIN_PRIORS = np.array([0.3, 0.25, 0.2, 0.15, 0.1])


def draw(priors, n, rng):
    y = rng.choice(len(priors), size=n, p=priors)
    return MEANS[y] + rng.normal(size=(n, 2)) * 0.6, y


@pytest.fixture(scope="module")
def model():
    """A logistic regression on 6,000 training items (TRAIN_PRIORS): calibrated posteriors under those priors,
    and its 5-fold out-of-fold probabilities. -> (fitted model, oof (N, C), y (N,), fold (N,))."""
    rng = np.random.default_rng(0)
    x, y = draw(TRAIN_PRIORS, 6000, rng)
    fold = rng.integers(0, 5, len(y))
    oof = np.zeros((len(y), 5))
    for k in range(5):
        oof[fold == k] = LogisticRegression().fit(x[fold != k], y[fold != k]).predict_proba(x[fold == k])
    return LogisticRegression().fit(x, y), oof, y, fold


def test_em_recovers_a_planted_prior_shift_and_the_adjusted_labels_gain(model):
    lr, *_ = model
    true_priors = np.array([0.05, 0.05, 0.1, 0.3, 0.5])             # the rare classes become the common ones
    x, y = draw(true_priors, 4000, np.random.default_rng(1))
    proba = lr.predict_proba(x)
    priors, adjusted, _ = em_priors(proba, TRAIN_PRIORS)
    assert np.abs(priors - true_priors).max() < 0.03, priors        # the stated error: 3 points per class
    f2c = np.arange(5)
    before = challenge_metric(y, proba.argmax(1), f2c)["mean"]
    after = challenge_metric(y, adjusted.argmax(1), f2c)["mean"]
    assert after > before + 0.02, (before, after)


def test_a_class_absent_from_the_split_gets_a_prior_near_zero(model):
    lr, *_ = model
    x, y = draw(np.array([0.4, 0.3, 0.3, 0.0, 0.0]), 3000, np.random.default_rng(2))
    priors, _, _ = em_priors(lr.predict_proba(x), TRAIN_PRIORS)
    assert priors[3:].max() < 0.02 and np.abs(priors[:3] - [0.4, 0.3, 0.3]).max() < 0.03, priors


def test_the_adapter_adjusts_a_shifted_split_and_leaves_an_unshifted_one(model):
    lr, oof, y, fold = model
    adapter = ShiftAdapter().fit(oof, y, fold, 5)
    same, _ = draw(TRAIN_PRIORS, 2000, np.random.default_rng(3))
    shifted, _ = draw(np.array([0.05, 0.05, 0.1, 0.3, 0.5]), 2000, np.random.default_rng(4))
    weights_same, _, record_same = adapter.adapt(lr.predict_proba(same))
    weights, _, record_shifted = adapter.adapt(lr.predict_proba(shifted))
    assert np.array_equal(weights_same, np.ones(5)) and weights[4] > 3 > 1 / 3 > weights[0]
    assert not record_same["applied"] and record_same["tv_from_training_priors"] < record_same["noise_bar"]
    assert record_shifted["applied"] and record_shifted["tv_from_training_priors"] > 0.2


def test_calibration_undoes_an_overconfident_temperature(model):
    _, oof, y, _ = model
    sharp = softmax(3 * np.log(oof + 1e-12))                        # the same ranking, 3x too confident
    cal = Calibrator().fit(sharp, y)
    assert abs(cal.a_ - 1 / 3) < 0.05
    nll = lambda p: -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))     # noqa: E731
    assert nll(cal.transform(sharp)) < nll(sharp) - 0.1


def known_split(p_rare):
    """40 items certain in class 0 or 1 (coarse 0 and 1) and one item whose probabilities are (rare: p_rare,
    0 and 1: the rest, shared); class 2 (its own coarse class) is the arg-max when p_rare is the largest."""
    proba = np.zeros((41, 3))
    proba[:20, 0] = proba[20:40, 1] = 1
    proba[40] = [(1 - p_rare) / 2, (1 - p_rare) / 2, p_rare]
    return proba, np.array([0, 1, 2])


def exact_expected(proba, pred, f2c):
    """The expected challenge mean-F1 of pred, enumerating the uncertain last item's three truths."""
    y = proba[:40].argmax(1)
    return sum(p * challenge_metric(np.r_[y, c], pred, f2c)["mean"] for c, p in enumerate(proba[40]) if p > 0)


@pytest.mark.parametrize("p_rare", [0.34, 0.5, 0.9])
def test_the_decoder_opens_a_rare_class_only_when_the_expected_metric_says_so(p_rare):
    proba, f2c = known_split(p_rare)
    pred, decisions = decode(proba, proba, f2c, n_samples=400)
    argmax = proba.argmax(1)
    moved = argmax.copy()
    moved[40] = 0
    best = max((argmax, moved), key=lambda p: exact_expected(proba, p, f2c))
    assert np.array_equal(pred, best), (p_rare, decisions)
    assert decisions and decisions[0]["class"] == 2


def test_the_decoder_moves_the_single_item_of_a_class_expected_far_below_one():
    proba, f2c = known_split(0.34)
    pred, decisions = decode(proba, proba, f2c)
    assert pred[40] != 2 and decisions[0]["moved"] and decisions[0]["expected_count"] == pytest.approx(0.34)


def test_a_class_without_training_items_cannot_capture_the_em_estimate(model):
    """A class of the category map with no labelled item (training prior 0) still gets a tiny calibrated
    probability (softmax never gives 0). EM's ratio prior / training prior must not let that class grow: it
    stays at 0, and a split without shift keeps its priors (the fashion tail run: every fold's estimate, and
    the test split's, collapsed onto such a class, TV 1.0, and label shift auto cost 0.08 of mean-F1)."""
    lr, oof, y, fold = model
    x, _ = draw(TRAIN_PRIORS, 2000, np.random.default_rng(5))
    proba = np.c_[lr.predict_proba(x) * (1 - 1e-9), np.full(len(x), 1e-9)]          # (N, 6): class 5 unseen
    train = np.r_[TRAIN_PRIORS, 0.0]
    priors, adjusted, _ = em_priors(proba, train)
    assert priors[5] == 0 and adjusted[:, 5].max() == 0
    assert np.abs(priors[:5] - TRAIN_PRIORS).max() < 0.03, priors
    oof6 = np.c_[oof * (1 - 1e-9), np.full(len(oof), 1e-9)]
    adapter = ShiftAdapter().fit(oof6, y, fold, 6)
    assert max(f["tv"] for f in adapter.fold_noise_) < 0.1
    weights, _, record = adapter.adapt(proba)
    assert not record["applied"] and np.array_equal(weights, np.ones(6)), record["tv_from_training_priors"]


def test_by_default_a_shift_is_estimated_and_recorded_but_the_labels_stay_the_reweighted_arg_max(model):
    from stacking.pipeline import StackOptions, decide
    from stacking.reweight import PriorReweighter
    lr, oof, y, fold = model
    adapter = ShiftAdapter().fit(oof, y, fold, 5)
    shifted, _ = draw(np.array([0.05, 0.05, 0.1, 0.3, 0.5]), 2000, np.random.default_rng(4))
    proba = lr.predict_proba(shifted)
    reweighter = PriorReweighter("power", taus=(0.0,)).fit(oof, y, np.bincount(y, minlength=5), np.arange(5))
    pred, record = decide(proba, reweighter, adapter, np.arange(5), StackOptions(decode=False))
    assert StackOptions().label_shift == "none"
    assert np.array_equal(pred, proba.argmax(1))
    assert not record["label_shift"]["applied"] and record["label_shift"]["auto_would_apply"]
    assert abs(record["label_shift"]["estimated_priors"][4] - 0.5) < 0.05
    applied, _ = decide(proba, reweighter, adapter, np.arange(5), StackOptions(decode=False, label_shift="auto"))
    assert not np.array_equal(applied, pred)
