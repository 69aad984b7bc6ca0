"""knn (retrieval votes): honest out-of-fold, the vote maths against a brute-force numpy kNN, the blocked
search equal to the unblocked one, a checkpoint that predicts alone, stores with one modality, resume."""
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from core import schema
from features.store import StoreReader
from neural import outputs, pipeline
from neural.checkpoint import load_fold
from neural.data import StoreBatches
from neural.folds import load_folds
from neural.models import FitContext, model_inputs
from neural.models.knn import FLOOR, top_k, vote
from neural.options import NeuralOptions
from neural.pipeline import train_neural
from neural.predict import predict_store
from neural.spec import spec_from_store
from neural.train import fit_fold
from tests.fakes import killed_on_call, write_fake_store

torch.set_num_threads(1)

TINY = dict(n_folds=3, batch_size=16, params={"knn.k": 5, "knn.dim": 8}, threads=1)


def accuracy(run_dir, model="knn"):
    oof, labels = outputs.read_oof(run_dir / model / "predictions.h5")
    return (oof.argmax(1) == labels).mean()


def brute_force(queries, bank, labels, k, temperature, n_classes):
    """The vote probabilities (B, C) by numpy: every similarity, a full sort, the weighted count."""
    sim = queries.astype(np.float64) @ bank.astype(np.float64).T                      # (B, N)
    near = np.argsort(-sim, axis=1)[:, :k]                                             # (B, k)
    out = np.zeros((len(queries), n_classes))
    for i, rows in enumerate(near):
        np.add.at(out[i], labels[rows], np.exp(sim[i, rows] / temperature))
    return out / out.sum(1, keepdims=True)


def test_held_out_rows_never_find_themselves(tmp_path, monkeypatch):
    """Features of pure noise, so no label can be predicted: honest out-of-fold votes stay at chance
    (1/6). The same run with every fold's bank holding all labelled rows, its held-out rows too (what
    a leak would do), scores ~1.0: each row finds itself at cosine 1, so the test can fail."""
    cache = tmp_path / "cache"
    write_fake_store(cache / "labeled.h5", n=120, signal=0.0)
    opts = NeuralOptions(**TINY)
    train_neural(cache, tmp_path / "honest", ["knn"], opts)
    assert accuracy(tmp_path / "honest") < 0.35

    real_fit = pipeline.fit_fold

    def leaky_fit(spec, context, *args, **kw):
        return real_fit(spec, replace(context, rows=np.arange(120)), *args, **kw)   # banks the held-out rows too

    monkeypatch.setattr(pipeline, "fit_fold", leaky_fit)
    train_neural(cache, tmp_path / "leaky", ["knn"], opts)
    assert accuracy(tmp_path / "leaky") > 0.95


def test_shuffled_labels_stay_at_chance(tmp_path):
    """Strong class signal in frames and text, then the labels shuffled: the OOF drops to chance."""
    cache = tmp_path / "cache"
    write_fake_store(cache / "labeled.h5", n=120, signal=3.0)
    train_neural(cache, tmp_path / "real", ["knn"], NeuralOptions(**TINY))
    assert accuracy(tmp_path / "real") > 0.9
    with h5py.File(cache / "labeled.h5", "r+") as h5:
        fine = np.random.default_rng(1).permutation(h5[schema.LABEL_FINE][:])
        h5[schema.LABEL_FINE][:] = fine
        h5[schema.LABEL_COARSE][:] = h5.attrs["fine_to_coarse"][fine]
    train_neural(cache, tmp_path / "shuffled", ["knn"], NeuralOptions(**TINY))
    assert accuracy(tmp_path / "shuffled") < 0.35


@pytest.mark.parametrize("block_rows", [1, 3, 7, 50, 1000])
def test_blocked_search_and_votes_equal_a_brute_force_knn(block_rows):
    """Blocks smaller than k, than the bank, and larger than the bank all give numpy's answer."""
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries = rng.normal(size=(6, 8)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    labels = rng.integers(0, 5, size=50)
    sim, idx = top_k(torch.from_numpy(queries), torch.from_numpy(bank), 10, block_rows)
    expected_sim = np.sort(queries @ bank.T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(sim.numpy(), expected_sim, atol=1e-6)
    proba = vote(sim, torch.from_numpy(labels)[idx], 5, 0.1).numpy()
    np.testing.assert_allclose(proba, brute_force(queries, bank, labels, 10, 0.1, 5), atol=1e-5)
    small, _ = top_k(torch.from_numpy(queries), torch.from_numpy(bank[:4]), 10, block_rows)
    assert small.shape == (6, 4)                                          # a bank smaller than k


def test_fold_model_votes_like_numpy_on_its_own_bank(tmp_path):
    """fit_fold's model: its bank is the training rows' vectors (unit length, float16) with their labels,
    and forward gives log of numpy's vote over that bank, fine and coarse, whatever the block size."""
    write_fake_store(tmp_path / "labeled.h5", n=60)
    reader = StoreReader(tmp_path / "labeled.h5")
    opts = NeuralOptions(**dict(TINY, params={"knn.k": 7, "knn.dim": 8, "knn.temperature": 0.1}))
    names = model_inputs("knn", reader)
    labels = reader.read(schema.LABEL_FINE, slice(None))
    dataset = StoreBatches(reader, names, labels, reader.fine_to_coarse, opts.max_tokens)
    train = np.arange(0, 60, 2)
    model, info = fit_fold(spec_from_store("knn", reader, opts, names), FitContext(dataset, train, opts.batch_size),
                           opts, 0, "cpu")
    assert not list(model.parameters()) and len(info["seconds_per_epoch"]) == 1
    assert model.bank.shape == (30, 8) and model.bank.dtype == torch.float16
    np.testing.assert_array_equal(model.bank_labels.numpy(), labels[train])
    np.testing.assert_allclose(model.bank.float().norm(dim=1).numpy(), 1, atol=2e-3)
    batch = dataset[np.arange(1, 60, 2)]
    queries = model.embed(batch).numpy()
    expected = brute_force(queries, model.bank.float().numpy(), labels[train], 7, 0.1, 6)
    for block_rows in (2, 5, 8192):
        model.block_rows = block_rows
        fine, coarse = model(batch)
        np.testing.assert_allclose(fine.exp().numpy(), expected * (1 - 6 * FLOOR) + FLOOR, atol=1e-5)
        coarse_expected = np.stack([expected[:, reader.fine_to_coarse == c].sum(1) for c in range(3)], 1)
        np.testing.assert_allclose(coarse.exp().numpy(), coarse_expected * (1 - 3 * FLOOR) + FLOOR, atol=1e-5)


def test_checkpoint_alone_predicts_what_the_run_wrote(tmp_path):
    """train_neural then predict_store from run.json and the fold files: the same probabilities; a fold
    checkpoint rebuilds a bank of that fold's size."""
    cache = tmp_path / "cache"
    write_fake_store(cache / "labeled.h5", n=61)
    write_fake_store(cache / "test.h5", n=20, split="test", labelled=False, seed=1)
    metrics = train_neural(cache, tmp_path / "run", ["knn"], NeuralOptions(**TINY))
    assert metrics["knn"]["oof"]["mean"] > 0.8
    assert all(np.isfinite(metrics["knn"]["seconds_per_epoch"]))
    fold = load_folds(tmp_path / "run" / "folds.h5")[1]
    for k in range(3):
        model, _, _ = load_fold(tmp_path / "run" / "knn", k)
        assert len(model.bank) == (fold != k).sum()
    proba = predict_store(tmp_path / "run", cache / "test.h5", models=["knn"])["knn"]
    with h5py.File(tmp_path / "run" / "knn" / "predictions.h5", "r") as h5:
        np.testing.assert_allclose(proba, h5["proba/test"][:], atol=1e-6)
    assert proba.min() > 0 and np.allclose(proba.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("keep", ["frames", "text"])
def test_a_store_with_one_modality_votes_on_that_modality(tmp_path, keep):
    """A frames-only store (every text field empty, as ucf14) and a text-only one (no frame): the empty
    block is zero in every row and the other carries the votes."""
    cache = tmp_path / "cache"
    write_fake_store(cache / "labeled.h5", n=90, signal=3.0)
    with h5py.File(cache / "labeled.h5", "r+") as h5:
        if keep == "frames":
            h5[schema.TEXT_POOLED][:] = 0
            h5[schema.TEXT_FIELD_MASK][:] = False
        else:
            h5[schema.FRAME_EMB][:] = 0
            h5[schema.FRAME_MASK][:] = False
    train_neural(cache, tmp_path / "run", ["knn"], NeuralOptions(**TINY))
    assert accuracy(tmp_path / "run") > 0.9


def test_a_killed_knn_run_resumes_to_the_same_oof(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    write_fake_store(cache / "labeled.h5", n=60)
    opts = NeuralOptions(**TINY)
    train_neural(cache, tmp_path / "straight", ["knn"], opts)
    real_fit = pipeline.fit_fold
    monkeypatch.setattr(pipeline, "fit_fold", killed_on_call(real_fit, 2))          # killed in fold 1
    with pytest.raises(KeyboardInterrupt):
        train_neural(cache, tmp_path / "resumed", ["knn"], opts)
    monkeypatch.setattr(pipeline, "fit_fold", real_fit)
    train_neural(cache, tmp_path / "resumed", ["knn"], opts)
    np.testing.assert_array_equal(outputs.read_oof(tmp_path / "resumed" / "knn" / "predictions.h5")[0],
                                  outputs.read_oof(tmp_path / "straight" / "knn" / "predictions.h5")[0])


def test_bad_knn_options_are_refused_naming_them():
    from neural.models import check_params
    with pytest.raises(ValueError, match=r"knn\.k must"):
        check_params({"knn.k": 0}, ["knn"])
    with pytest.raises(ValueError, match=r"knn\.temperature > 0"):
        check_params({"temperature": 0.0}, ["linear", "knn"])
