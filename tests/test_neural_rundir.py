"""RUN_DIR/run.json: one reader that checks its fields, and a resumed run refused when its store changed."""
import json

import h5py
import pytest
import torch

from neural import outputs, pipeline
from neural.options import NeuralOptions
from neural.outputs import RunError, read_run
from neural.pipeline import train_neural
from tests.fakes import TINY, killed_on_call, write_fake_store

torch.set_num_threads(1)


def test_read_run_names_the_file_and_the_missing_or_mistyped_field(tmp_path):
    with pytest.raises(RunError, match=r"run.json.*not a train-neural run directory"):
        read_run(tmp_path)
    run = {"cache_dir": "c", "store_config": {}, "fine_classes": ["a", "b"], "coarse_classes": ["x"],
           "fine_to_coarse": [0, 0], "options": {}, "seed": 0, "n_folds": 3, "models": ["mlp"]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert read_run(tmp_path) == run
    (tmp_path / "run.json").write_text(json.dumps(dict(run, n_folds="3")))
    with pytest.raises(RunError, match=r"run.json: field 'n_folds' should be a int"):
        read_run(tmp_path)
    del run["fine_classes"]
    (tmp_path / "run.json").write_text(json.dumps(run))
    with pytest.raises(RunError, match=r"run.json: field 'fine_classes' is missing"):
        read_run(tmp_path)


def test_resuming_on_a_store_extracted_again_since_the_run_began_is_refused(tmp_path, monkeypatch):
    """Same ids and shapes, other config and content: fold 0 came from the old features, so the run must
    not go on with the new ones (before, folds 1-2 trained on them and run.json was quietly rewritten)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    write_fake_store(cache / "labeled.h5", n=30)
    real_fit = pipeline.fit_fold
    monkeypatch.setattr(pipeline, "fit_fold", killed_on_call(real_fit, 2))          # killed in fold 1
    with pytest.raises(KeyboardInterrupt):
        train_neural(cache, tmp_path / "run", ["linear"], NeuralOptions(**TINY))
    before = (tmp_path / "run" / "run.json").read_text()

    write_fake_store(cache / "labeled.h5", n=30, seed=7)          # extracted again, other content
    with h5py.File(cache / "labeled.h5", "r+") as h5:
        h5.attrs["config"] = json.dumps({"fake": True, "frame_encoder": "clip:ViT-B-16"})
    monkeypatch.setattr(pipeline, "fit_fold", real_fit)
    with pytest.raises(RunError, match=r"run.json.*store_config.frame_encoder: None -> 'clip:ViT-B-16'"):
        train_neural(cache, tmp_path / "run", ["linear"], NeuralOptions(**TINY))
    assert (tmp_path / "run" / "run.json").read_text() == before
    done, _ = outputs.fold_done(tmp_path / "run" / "linear" / "predictions.h5")
    assert done.tolist() == [True, False, False]
