"""Fold checkpoints are tensors (safetensors) plus a JSON record: loading never runs code, and a fold whose
record or tensors do not fit its spec is refused naming the file."""
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from neural.checkpoint import CheckpointError, fold_paths
from neural.options import NeuralOptions
from neural.pipeline import train_neural
from neural.predict import predict_store
from tests.fakes import TINY

torch.set_num_threads(1)


class WritesAMarker:
    """Unpickling this calls open(marker, "w"): code run by loading, which a checkpoint must never do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def run(linear_run, tmp_path):
    """A fresh copy of the session's finished linear run, to damage."""
    shutil.copytree(linear_run, tmp_path / "run")
    return tmp_path / "run"


def test_a_pickle_where_a_checkpoint_is_expected_is_refused_not_executed(fake_cache, run, tmp_path):
    marker = tmp_path / "code-ran"
    tensors = fold_paths(run / "linear", 0)[0]
    with open(tensors, "wb") as fh:
        pickle.dump({"state_dict": WritesAMarker(marker)}, fh)
    with pytest.raises(CheckpointError, match=r"fold0\.safetensors: not a readable safetensors file"):
        predict_store(run, fake_cache / "labeled.h5")
    torch.save({"state_dict": WritesAMarker(marker)}, tensors)            # torch's zip pickle format too
    with pytest.raises(CheckpointError, match=r"fold0\.safetensors: not a readable safetensors file"):
        predict_store(run, fake_cache / "labeled.h5")
    (run / "linear" / "predictions.h5").unlink()                          # resuming reloads the fold
    with pytest.raises(CheckpointError, match=r"fold0\.safetensors"):
        train_neural(fake_cache, run, ["linear"], NeuralOptions(**TINY))
    assert not marker.exists()


def test_an_old_pickle_checkpoint_is_named_and_never_loaded(fake_cache, run, tmp_path):
    marker = tmp_path / "code-ran"
    for path in fold_paths(run / "linear", 1):
        path.unlink()
    torch.save({"state_dict": WritesAMarker(marker)}, run / "linear" / "fold1.pt")
    with pytest.raises(CheckpointError, match=r"fold1\.json: fold checkpoint missing; fold1\.pt is an old pickle"):
        predict_store(run, fake_cache / "labeled.h5")
    assert not marker.exists()


def test_a_record_whose_spec_does_not_fit_the_tensors_is_refused_naming_the_file(fake_cache, run):
    record_path = fold_paths(run / "linear", 2)[1]
    record = json.loads(record_path.read_text())
    record["spec"]["n_fine"] += 1
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"fold2\.safetensors: tensors do not fit the model spec.*heads\.fine"):
        predict_store(run, fake_cache / "labeled.h5")
    del record["spec"]["hidden"]
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"fold2\.json: model spec field\(s\) hidden missing"):
        predict_store(run, fake_cache / "labeled.h5")
    record_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"fold2\.json: not valid JSON"):
        predict_store(run, fake_cache / "labeled.h5")


def test_tensors_missing_a_name_are_refused_naming_the_file(fake_cache, run):
    from safetensors.torch import load_file, save_file
    tensors_path = fold_paths(run / "linear", 0)[0]
    tensors = load_file(str(tensors_path))
    tensors.pop("mean")
    save_file(tensors, str(tensors_path))
    with pytest.raises(CheckpointError, match=r"fold0\.safetensors: tensors do not fit.*missing mean"):
        predict_store(run, fake_cache / "labeled.h5")


def test_a_saved_run_predicts_as_it_was_trained(fake_cache, linear_run):
    proba = predict_store(linear_run, fake_cache / "labeled.h5")["linear"]
    assert proba.shape == (60, 6) and np.allclose(proba.sum(1), 1, atol=1e-5)
