"""neural.metrics: the paired bootstrap behind auto's choice and the benches' bands.

Each resample's mean-F1 is challenge_metric on the drawn rows (sklearn's F1s), every prediction is
scored on the same draws (so differences are paired), and the draws do not depend on the chunking.
"""
import numpy as np
import pytest

from neural.metrics import PairedBootstrap, band, challenge_metric


def labels(n=400, n_classes=25, seed=0):
    rng = np.random.default_rng(seed)
    f2c = np.arange(n_classes) % 5
    true = rng.integers(0, n_classes, n)
    pred = np.where(rng.random(n) < 0.7, true, rng.integers(0, n_classes, n))
    return true, pred, f2c


def test_each_resample_scores_as_challenge_metric_on_its_rows():
    true, pred, f2c = labels()
    boot = PairedBootstrap(true, f2c, n_resamples=30, seed=3, chunk=7)
    means = boot.means(pred)
    draws = np.concatenate(list(boot.draws()))                    # (30, N)
    assert means.shape == (30,) and draws.shape == (30, len(true))
    for b in (0, 6, 7, 29):                                        # both sides of a chunk boundary
        assert means[b] == pytest.approx(challenge_metric(true[draws[b]], pred[draws[b]], f2c)["mean"])
    assert len(np.unique(means)) > 20                              # resamples differ


def test_draws_are_paired_and_independent_of_the_chunk():
    true, pred, f2c = labels()
    a = PairedBootstrap(true, f2c, n_resamples=40, seed=1, chunk=40)
    b = PairedBootstrap(true, f2c, n_resamples=40, seed=1, chunk=3)
    np.testing.assert_array_equal(np.concatenate(list(a.draws())), np.concatenate(list(b.draws())))
    np.testing.assert_array_equal(a.means(pred), b.means(pred))
    # a prediction against itself differs by exactly zero on every resample; another seed draws otherwise
    assert not (a.means(pred) - a.means(pred)).any()
    assert not np.array_equal(a.means(pred), PairedBootstrap(true, f2c, 40, seed=2).means(pred))


def test_a_better_prediction_has_its_gain_band_above_zero():
    true, pred, f2c = labels(n=2000)
    better = np.where(np.random.default_rng(5).random(len(true)) < 0.5, true, pred)     # half the errors mended
    boot = PairedBootstrap(true, f2c, n_resamples=200)
    lo, hi = band(boot.means(better) - boot.means(pred))
    assert 0 < lo < hi
    lo, hi = band(boot.means(pred) - boot.means(better))
    assert lo < hi < 0


def test_a_prediction_of_another_length_is_refused():
    true, pred, f2c = labels()
    with pytest.raises(ValueError, match="shape"):
        PairedBootstrap(true, f2c).means(pred[:-1])


def test_truth_classes_only_leaves_out_the_classes_only_predicted():
    f2c = np.array([0, 0, 1, 1])
    true = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 3, 2, 2])                    # one item put into class 3, absent from the truth
    default = challenge_metric(true, pred, f2c)
    own = challenge_metric(true, pred, f2c, truth_classes_only=True)
    assert own["l2_micro"] == default["l2_micro"] and own["l1_micro"] == default["l1_micro"]
    assert own["l2_macro"] > default["l2_macro"]           # class 3's F1 of 0 no longer averaged in
    assert own["l2_macro"] == np.mean([1.0, 2 / 3, 1.0])   # classes 0, 1 (one of two found), 2
