"""The frames model: a softmax regression on every frame, solved by L-BFGS when the fold starts, frame
probabilities averaged; it learns, predicts the same whatever the batch, and round-trips a checkpoint."""
import numpy as np
import torch

from features.store import StoreReader
from neural.checkpoint import load_fold, save_fold
from neural.data import StoreBatches
from neural.models import FitContext, model_inputs
from neural.models.frames import frame_probe_fit
from neural.options import NeuralOptions
from neural.pipeline import train_neural
from neural.spec import spec_from_store
from neural.train import fit_fold, predict_rows
from tests.fakes import write_fake_store

torch.set_num_threads(1)
OPTS = dict(n_folds=3, epochs=2, batch_size=16)


def fitted(tmp_path, n=60, rows=None):
    write_fake_store(tmp_path / "labeled.h5", n=n, signal=1.0)
    reader = StoreReader(tmp_path / "labeled.h5")
    opts = NeuralOptions(**OPTS)
    names = model_inputs("frames", reader)
    labels = reader.read("label_fine", slice(None))
    dataset = StoreBatches(reader, names, labels, reader.fine_to_coarse, opts.max_tokens)
    spec = spec_from_store("frames", reader, opts, names)
    rows = np.arange(n) if rows is None else rows
    model, info = fit_fold(spec, FitContext(dataset, rows, opts.batch_size), opts, seed=0, device="cpu")
    return model, info, spec, dataset, labels


def test_frame_probe_fit_reaches_the_l2_optimum():
    """At the returned W, b the gradient of the objective is zero (the problem is convex)."""
    rng = np.random.default_rng(0)
    labels = torch.as_tensor(np.arange(40) % 4)
    frames = torch.as_tensor(rng.normal(size=(40, 5, 6)), dtype=torch.float32) + labels[:, None, None] * 0.5
    mask = torch.as_tensor(rng.random((40, 5)) < 0.7)
    mask[:, 0] = True
    l2 = 0.05
    W, b = frame_probe_fit(frames, mask, labels, 4, l2)
    W, b = W.double().requires_grad_(True), b.double().requires_grad_(True)
    weight = mask.double() / mask.sum(1, keepdim=True).double() / 40                      # (N, F)
    logits = frames.double() @ W.T + b                                                    # (N, F, C)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 4), labels.repeat_interleave(5), reduction="none")
    loss = (weight.reshape(-1) * ce).sum() + 0.5 * l2 * (W * W).sum()
    loss.backward()
    assert W.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_frames_learns_the_classes_of_unseen_rows(tmp_path):
    model, info, spec, dataset, labels = fitted(tmp_path, n=90, rows=np.arange(60))
    proba = predict_rows([model], dataset, np.arange(60, 90), 16, "cpu")
    assert (proba.argmax(1) == labels[60:]).mean() > 0.9
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)


def test_predictions_are_the_mean_of_real_frame_probabilities_whatever_the_batch(tmp_path):
    model, _, _, dataset, _ = fitted(tmp_path)
    rows = np.arange(60)
    proba = predict_rows([model], dataset, rows, 7, "cpu")
    np.testing.assert_allclose(proba, predict_rows([model], dataset, rows, 60, "cpu"), atol=1e-6)
    batch = dataset[rows]
    x = (batch["frame_emb"] - model.mean) * model.scale
    p = torch.softmax(model.probe(x) * model.log_temperature.exp(), -1)                   # (N, F, C)
    m = batch["frame_mask"].float()
    expected = (p * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    np.testing.assert_allclose(proba, expected.detach().numpy(), atol=1e-5)
    fine, coarse = model.eval()(batch)                                 # coarse: fine summed per coarse class
    c = torch.exp(coarse)
    np.testing.assert_allclose(c.sum(1).detach().numpy(), 1, atol=1e-5)


def test_the_probe_is_fixed_by_initialise_and_only_the_temperature_trains(tmp_path):
    model, _, spec, dataset, _ = fitted(tmp_path)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["log_temperature"]
    assert float(model.log_temperature.detach()) != 0.0         # the loop moved it


def test_checkpoint_round_trip_predicts_the_same(tmp_path):
    model, info, spec, dataset, _ = fitted(tmp_path)
    (tmp_path / "frames").mkdir()
    save_fold(tmp_path / "frames", 0, model, spec, info, NeuralOptions(**OPTS))
    again, _, _ = load_fold(tmp_path / "frames", 0)
    rows = np.arange(60)
    np.testing.assert_array_equal(predict_rows([model], dataset, rows, 16, "cpu"),
                                  predict_rows([again], dataset, rows, 16, "cpu"))


def test_train_neural_writes_frames_oof(tmp_path):
    (tmp_path / "cache").mkdir()
    write_fake_store(tmp_path / "cache" / "labeled.h5", n=60, signal=1.0)
    metrics = train_neural(tmp_path / "cache", tmp_path / "run", ["frames"], NeuralOptions(**OPTS))
    assert metrics["frames"]["oof"]["mean"] > 0.9, metrics["frames"]["oof"]
