"""train-neural on tiny fake stores: each model learns, folds, OOF construction, resume, errors."""
import h5py
import numpy as np
import pytest
import torch

from features.class_names import load_class_names
from features.store import StoreError, StoreReader
from neural import outputs, pipeline
from features.codebook import Codebook
from neural.checkpoint import fold_saved
from neural.data import StoreBatches
from neural.folds import load_folds, make_folds
from neural.models import FitContext, model_inputs
from neural.options import NeuralOptions
from neural.pipeline import available_models, train_neural
from neural.predict import predict_store
from neural.spec import spec_from_store
from neural.train import fit_fold, predict_rows
from tests.fakes import TINY, killed_on_call, write_fake_store

torch.set_num_threads(1)


TINY = dict(TINY, epochs=2, hidden=32, n_heads=4)


@pytest.mark.parametrize("model", ["single", "dual", "cross", "vlad", "mlp", "linear"])
def test_each_model_loss_falls(fake_cache, model):
    reader = StoreReader(fake_cache / "labeled.h5")
    opts = NeuralOptions(**dict(TINY, epochs=10, lr=3e-3, label_smoothing=0.0, ema=False))
    names = model_inputs(model, reader)
    labels = reader.read("label_fine", slice(None))
    dataset = StoreBatches(reader, names, labels, reader.fine_to_coarse, opts.max_tokens)
    codebook = Codebook.load(fake_cache / "codebook.h5") if model == "vlad" else None
    spec = spec_from_store(model, reader, opts, names, codebook)
    context = FitContext(dataset, np.arange(len(reader)), opts.batch_size, codebook=codebook)
    _, info = fit_fold(spec, context, opts, seed=0, device="cpu")
    losses = info["epoch_loss"]
    assert losses[-1] < 0.7 * losses[0], losses


def test_folds_are_stratified_and_keep_rare_classes():
    labels = np.array([0] * 20 + [1] * 10 + [2] * 3 + [3] * 1 + [4] * 2)
    fold = make_folds(labels, 5, seed=0)
    assert fold.min() == 0 and fold.max() == 4 and (fold >= 0).all()
    for c in (0, 1):                                   # common classes: same count in every fold
        assert set(np.bincount(fold[labels == c], minlength=5)) == {len(labels[labels == c]) // 5}
    for c in (2, 3, 4):                                # rare classes: each item in a different fold
        assert len(set(fold[labels == c])) == (labels == c).sum()
    assert np.array_equal(fold, make_folds(labels, 5, seed=0))
    assert not np.array_equal(fold, make_folds(labels, 5, seed=1))


def test_oof_rows_come_only_from_the_fold_model_that_did_not_see_them(fake_cache, tmp_path, monkeypatch):
    seen = {}                                          # fold seed -> store rows the model trained on
    real_fit = pipeline.fit_fold

    def recording_fit(spec, context, options, seed, *args, **kw):
        seen[seed] = set(context.rows.tolist())
        return real_fit(spec, context, options, seed, *args, **kw)

    monkeypatch.setattr(pipeline, "fit_fold", recording_fit)
    opts = NeuralOptions(**TINY)
    train_neural(fake_cache, tmp_path / "run", ["mlp"], opts)
    ids, fold, n_folds, _ = load_folds(tmp_path / "run" / "folds.h5")
    assert n_folds == 3 and len(ids) == 60
    oof, _ = outputs.read_oof(tmp_path / "run" / "mlp" / "predictions.h5")
    reader = StoreReader(fake_cache / "labeled.h5")
    run = pipeline.ModelRun("mlp", pipeline.RunShared(tmp_path / "run", fake_cache, reader, {}, opts, fold,
                                                      np.arange(60), reader.read("label_fine", slice(None))))
    for k in range(n_folds):
        held = np.flatnonzero(fold == k)
        assert not seen[k] & set(held.tolist())                      # never trained on its OOF rows
        assert seen[k] | set(held.tolist()) == set(range(60))        # trained on all the others
        model = run.load(k)
        from neural.train import predict_rows
        np.testing.assert_allclose(oof[held], predict_rows([model], run.dataset, held, 16, "cpu"), atol=1e-6)
    np.testing.assert_allclose(oof.sum(1), 1, atol=1e-5)            # every row written, a distribution


def test_resume_after_a_killed_fold_gives_the_same_oof(fake_cache, tmp_path, monkeypatch):
    opts = NeuralOptions(**TINY)
    train_neural(fake_cache, tmp_path / "straight", ["single"], opts)
    straight, _ = outputs.read_oof(tmp_path / "straight" / "single" / "predictions.h5")

    real_fit = pipeline.fit_fold
    monkeypatch.setattr(pipeline, "fit_fold", killed_on_call(real_fit, 3))          # killed in fold 2
    with pytest.raises(KeyboardInterrupt):
        train_neural(fake_cache, tmp_path / "resumed", ["single"], opts)
    done, complete = outputs.fold_done(tmp_path / "resumed" / "single" / "predictions.h5")
    assert done.tolist() == [True, True, False] and not complete

    trained = []
    monkeypatch.setattr(pipeline, "fit_fold", lambda *a, **kw: trained.append(a[3]) or real_fit(*a, **kw))
    metrics = train_neural(fake_cache, tmp_path / "resumed", ["single"], opts)
    assert trained == [2]                              # folds 0 and 1 were skipped
    resumed, _ = outputs.read_oof(tmp_path / "resumed" / "single" / "predictions.h5")
    np.testing.assert_array_equal(resumed, straight)
    assert set(metrics["single"]["oof"]) == {"mean", "l2_micro", "l2_macro", "l1_micro", "l1_macro"}


def test_outputs_follow_the_run_directory_contract(fake_cache, tmp_path):
    opts = NeuralOptions(**TINY)
    train_neural(fake_cache, tmp_path / "run", ["cross"], opts)
    with h5py.File(tmp_path / "run" / "cross" / "predictions.h5", "r") as h5:
        assert h5.attrs["complete"]
        assert h5["oof_proba"].shape == (60, 6) and h5["proba/test"].shape == (20, 6)
        assert len(h5["ids_test"]) == 20
        test_proba = h5["proba/test"][:]
    proba = predict_store(tmp_path / "run", fake_cache / "test.h5")["cross"]
    np.testing.assert_allclose(proba, test_proba, atol=1e-6)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)


def test_a_resumed_run_with_other_options_is_refused(fake_cache, tmp_path, monkeypatch):
    train_neural(fake_cache, tmp_path / "run", ["mlp"], NeuralOptions(**TINY))
    with pytest.raises(outputs.RunError, match="lr"):
        train_neural(fake_cache, tmp_path / "run", ["mlp"], NeuralOptions(**dict(TINY, lr=0.1)))


def test_a_store_without_aggregates_names_the_dataset_and_the_command(tmp_path):
    write_fake_store(tmp_path / "labeled.h5", n=30)
    with pytest.raises(StoreError, match=r"agg/first_frame.*python run.py extract"):
        train_neural(tmp_path, tmp_path / "run", ["mlp"], NeuralOptions(**TINY))


def test_store_reads_match_h5py_fancy_indexing(fake_cache):
    from features.store import StoreReader
    rows = np.array([0, 3, 4, 17, 59])
    reader = StoreReader(fake_cache / "labeled.h5")
    with h5py.File(fake_cache / "labeled.h5", "r") as h5:
        for name in ("frame_emb", "frame_mask", "text_tokens", "text_token_mask", "text_pooled",
                     "agg/first_frame", "agg/nextvlad", "label_fine"):
            np.testing.assert_array_equal(reader.read(name, rows), h5[name][rows], err_msg=name)


def test_a_fold_killed_after_its_checkpoint_is_not_retrained(fake_cache, tmp_path, monkeypatch):
    opts = NeuralOptions(**TINY)
    train_neural(fake_cache, tmp_path / "straight", ["mlp"], opts)
    straight, _ = outputs.read_oof(tmp_path / "straight" / "mlp" / "predictions.h5")
    writes, real_write = [], outputs.write_fold_batches

    def killed_before_rows(*args):
        writes.append(1)
        if len(writes) == 2:
            raise KeyboardInterrupt("killed")
        return real_write(*args)

    monkeypatch.setattr(outputs, "write_fold_batches", killed_before_rows)
    with pytest.raises(KeyboardInterrupt):
        train_neural(fake_cache, tmp_path / "resumed", ["mlp"], opts)
    assert fold_saved(tmp_path / "resumed" / "mlp", 1)
    monkeypatch.setattr(outputs, "write_fold_batches", real_write)
    trained, real_fit = [], pipeline.fit_fold
    monkeypatch.setattr(pipeline, "fit_fold", lambda *a, **kw: trained.append(a[3]) or real_fit(*a, **kw))
    train_neural(fake_cache, tmp_path / "resumed", ["mlp"], opts)
    assert trained == [2]                              # fold 1 came back from its checkpoint
    resumed, _ = outputs.read_oof(tmp_path / "resumed" / "mlp" / "predictions.h5")
    np.testing.assert_array_equal(resumed, straight)


def test_vlad_without_a_codebook_says_which_command_makes_it(fake_cache, tmp_path):
    import shutil
    for name in ("labeled.h5",):
        shutil.copy(fake_cache / name, tmp_path / name)
    with pytest.raises(StoreError, match=r"codebook.h5.*python run.py extract"):
        train_neural(tmp_path, tmp_path / "run", ["vlad"], NeuralOptions(**TINY))


def test_names_model_recognises_a_class_it_never_trained_on(fake_cache):
    """Trained without class 5's videos, the names model still labels them: it has no per-class weight,
    only the match of a video's text with each class's name vector."""
    reader = StoreReader(fake_cache / "labeled.h5")
    labels = reader.read("label_fine", slice(None))
    seen, unseen = np.flatnonzero(labels != 5), np.flatnonzero(labels == 5)
    opts = NeuralOptions(**dict(TINY, epochs=4))
    names = model_inputs("names", reader)
    dataset = StoreBatches(reader, names, labels, reader.fine_to_coarse, opts.max_tokens)
    context = FitContext(dataset, seen, opts.batch_size, class_names=load_class_names(fake_cache, reader.fine_classes))
    net, _ = fit_fold(spec_from_store("names", reader, opts, names), context, opts, seed=0, device="cpu")
    predicted = predict_rows([net], dataset, unseen, 16, "cpu").argmax(axis=1)
    assert (predicted == 5).mean() >= 0.8, predicted


def test_names_model_is_refused_without_class_names_and_left_out_by_default(fake_cache, tmp_path):
    import shutil
    shutil.copy(fake_cache / "labeled.h5", tmp_path / "labeled.h5")
    with pytest.raises(ValueError, match=r"class_names.h5.*names every class"):
        train_neural(tmp_path, tmp_path / "run", ["names"], NeuralOptions(**TINY))
    assert "names" not in available_models(tmp_path)
    assert "names" in available_models(fake_cache) and "linear" in available_models(fake_cache)


def test_names_model_predicts_from_its_checkpoint_alone(fake_cache, tmp_path):
    """The name vectors travel in the fold checkpoints: predicting needs no class_names.h5."""
    train_neural(fake_cache, tmp_path / "run", ["names"], NeuralOptions(**TINY))
    oof, _ = outputs.read_oof(tmp_path / "run" / "names" / "predictions.h5")
    labels = StoreReader(fake_cache / "labeled.h5").read("label_fine", slice(None))
    assert (oof.argmax(axis=1) == labels).mean() > 0.8
    (fake_cache / "class_names.h5").rename(tmp_path / "moved.h5")
    try:
        proba = predict_store(tmp_path / "run", fake_cache / "labeled.h5", models=["names"])["names"]
    finally:
        (tmp_path / "moved.h5").rename(fake_cache / "class_names.h5")
    assert (proba.argmax(axis=1) == labels).mean() > 0.8


def test_fold_models_of_every_model_predict_without_the_cache_files_that_initialised_them(fake_cache, tmp_path):
    """A fold model is its ModelSpec and tensors: with codebook.h5 and class_names.h5 gone, and from a
    directory holding only run.json and <model>/fold<k>.{safetensors,json} (what the packaged model
    directory keeps under neural/), every model predicts exactly what train-neural wrote."""
    import shutil
    from neural.models import MODEL_NAMES
    opts = NeuralOptions(**dict(TINY, epochs=1))
    train_neural(fake_cache, tmp_path / "run", list(MODEL_NAMES), opts)
    bare = tmp_path / "bare"
    for model in MODEL_NAMES:
        (bare / model).mkdir(parents=True)
        for k in range(opts.n_folds):
            for suffix in (".safetensors", ".json"):
                shutil.copy(tmp_path / "run" / model / f"fold{k}{suffix}", bare / model)
    shutil.copy(tmp_path / "run" / "run.json", bare / "run.json")
    store = tmp_path / "store" / "test.h5"                 # the test store alone, away from its cache
    store.parent.mkdir()
    shutil.copy(fake_cache / "test.h5", store)
    for name in ("codebook.h5", "class_names.h5"):
        (fake_cache / name).rename(tmp_path / name)
    try:
        with StoreReader(store) as reader:
            probas = predict_store(bare, models=list(MODEL_NAMES), reader=reader)
    finally:
        for name in ("codebook.h5", "class_names.h5"):
            (tmp_path / name).rename(fake_cache / name)
    for model in MODEL_NAMES:
        with h5py.File(tmp_path / "run" / model / "predictions.h5", "r") as h5:
            np.testing.assert_allclose(probas[model], h5["proba/test"][:], atol=1e-6, err_msg=model)
