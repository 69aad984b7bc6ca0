"""Near-duplicate groups (`train-neural --groups auto`, neural/neardup.py): planted groups are recovered,
data without duplicates is left ungrouped, and a run records the rule and keeps each group in one fold."""
import json

import h5py
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from core import schema
from neural.folds import folds_groups_auto, load_folds, make_folds
from neural.neardup import NearDupRule, find_groups
from neural.options import NeuralOptions
from neural.outputs import RunError
from neural.pipeline import train_neural
from tests.fakes import write_fake_store

torch.set_num_threads(1)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n, dim, rng, n_clusters=20):
    """(n, dim) points around n_clusters centres: classes without any near-duplicate."""
    centres = rng.normal(size=(n_clusters, dim)) * 2
    return centres[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, dim))


def planted(dim, rng, n_groups=60, size=3, n_other=600, noise=0.03):
    """Unit vectors: n_groups groups of `size` near-copies of one point (noise relative to the spread)
    among n_other distinct points. -> (z (N, dim), true group (N,))."""
    x = clustered(n_groups + n_other, dim, rng)
    copies = np.repeat(x[:n_groups], size, axis=0) + rng.normal(size=(n_groups * size, dim)) * noise
    truth = np.r_[np.repeat(np.arange(n_groups), size), n_groups + np.arange(n_other)]
    return unit(np.vstack([copies, x[n_groups:]])), truth


@pytest.mark.parametrize("dim", [16, 64, 256])
def test_planted_near_duplicate_groups_are_recovered_and_little_else_is_joined(dim):
    z, truth = planted(dim, np.random.default_rng(dim))
    group, record = find_groups(z)
    assert record["used"] and adjusted_rand_score(truth, group) > 0.95, record
    for g in range(60):                 # every planted group whole, and alone
        assert len(np.unique(group[truth == g])) == 1 and np.sum(group == group[truth == g][0]) == 3, g
    # distinct points joined by chance: at most the rule's chance rate (0.5%) twice over
    distinct = truth >= 60
    assert np.sum(np.bincount(group)[group[distinct]] > 1) <= 0.01 * distinct.sum(), record


@pytest.mark.parametrize("dim", [8, 32, 128])
def test_data_without_duplicates_is_not_grouped(dim):
    group, record = find_groups(unit(clustered(1500, dim, np.random.default_rng(dim))))
    assert not record["used"] and record["n_grouped"] < 0.01 * 1500, record


def test_a_group_never_exceeds_the_cap():
    z, _ = planted(32, np.random.default_rng(0), n_groups=4, size=12, n_other=300)
    group, record = find_groups(z, NearDupRule(cap=5))
    assert np.bincount(group).max() <= 5 and record["largest"] <= 5


def write_store_with_duplicates(path, n=300, n_dup=20, size=3, seed=0):
    """A fake labelled store whose first n_dup * size rows are n_dup groups of `size` near-copies of one
    video (the same class). -> (labels (N,), true group of the planted rows (n_dup * size,))."""
    labels = write_fake_store(path, n=n, seed=seed)
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r+") as h5:
        for g in range(n_dup):
            src = g * size
            for j in range(src + 1, src + size):
                for name in (schema.FRAME_EMB, schema.TEXT_POOLED, schema.FRAME_MASK, schema.TEXT_FIELD_MASK):
                    row = h5[name][src]
                    if row.dtype != bool:
                        row = (row + rng.normal(size=row.shape) * 0.01).astype(row.dtype)
                    h5[name][j] = row
                for name in (schema.LABEL_FINE, schema.LABEL_COARSE):
                    h5[name][j] = h5[name][src]
        labels = h5[schema.LABEL_FINE][:]
    return labels, np.repeat(np.arange(n_dup), size)


TINY = dict(n_folds=3, epochs=1, hidden=16, batch_size=32, n_heads=4, threads=1, splits=())


def test_auto_groups_keep_each_planted_group_in_one_fold_and_are_recorded(tmp_path):
    labels, truth = write_store_with_duplicates(tmp_path / "labeled.h5")
    train_neural(tmp_path, tmp_path / "run", ["linear"], NeuralOptions(**TINY, groups="auto"))
    _, fold, _, _ = load_folds(tmp_path / "run" / "folds.h5")
    for g in np.unique(truth):
        assert len(np.unique(fold[:len(truth)][truth == g])) == 1, g
    record = folds_groups_auto(tmp_path / "run" / "folds.h5")
    assert record["used"] and record["n_grouped"] >= len(truth) and record["features"] == ["mean_frame", "text"]
    assert 0 < record["f"] < 1 and record["intrinsic_dim"] >= 1
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["groups"]["auto"] == record
    with h5py.File(tmp_path / "run" / "folds.h5", "r") as h5:
        assert h5.attrs["grouped"] and len(h5["group"]) == len(fold)
    with pytest.raises(RunError, match=r"folds were drawn with --groups auto, this run has no groups"):
        train_neural(tmp_path, tmp_path / "run", ["linear"], NeuralOptions(**TINY, groups="none"))


def test_auto_groups_leave_the_stratified_folds_when_the_data_has_no_duplicates(tmp_path):
    labels = write_fake_store(tmp_path / "labeled.h5", n=300)
    train_neural(tmp_path, tmp_path / "run", ["linear"], NeuralOptions(**TINY))       # the default: auto
    _, fold, _, _ = load_folds(tmp_path / "run" / "folds.h5")
    assert np.array_equal(fold, make_folds(labels, 3, 0))
    record = folds_groups_auto(tmp_path / "run" / "folds.h5")
    assert not record["used"] and "not used" in record["reason"]
    with h5py.File(tmp_path / "run" / "folds.h5", "r") as h5:
        assert not h5.attrs["grouped"] and "group" not in h5
