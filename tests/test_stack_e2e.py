"""`predict` end to end: raw videos -> extract -> aggregates -> fold models -> stack, on tiny data.

The pipeline (extract, aggregates, train-neural, stack) runs once on a generated feature-zip dataset
(precomputed frame features, so no frame encoder; the embedded MiniLM encodes the text). `predict`
then re-extracts splits from the raw data into a cache of its own and must reproduce what the
pipeline stored: the submission for the test split, and for the labelled split the stack applied to
the fold models' predictions on the pipeline's own labelled store.
"""
from dataclasses import fields

import numpy as np
import pytest

from features import schema
from features.aggregates import AggregateOptions, run_aggregates
from features.extract import ExtractOptions, extract
from features.store import StoreReader
from demo.synthetic import generate_feature_zip_dataset
from neural.options import NeuralOptions
from neural.pipeline import train_neural
from neural.predict import predict_store
from stacking.pipeline import StackOptions, stack
from inference.predict import PredictError, predict, predict_from_probas

AGG = dict(pca_dim=8, n_clusters=4, n_gmm=2, nextvlad_expansion=2, nextvlad_groups=4, sample_size=400)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data, cache = root / "data", root / "cache"
    generate_feature_zip_dataset(data, 36, n_frames=4, dim=16, split="labeled", n_classes=4,
                                 signal=1.0, tail_ratio=3.0, progress=False)
    generate_feature_zip_dataset(data, 8, n_frames=4, dim=16, split="test", n_classes=4,
                                 with_labels=False, progress=False)
    options = dict(frames=4, max_tokens=16, batch_size=16, workers=0, device="cpu")
    if "aggregates" in {f.name for f in fields(ExtractOptions)}:      # extract runs aggregates itself
        extract(data, ["labeled", "test"], cache, ExtractOptions(**options, aggregates=AggregateOptions(**AGG)))
    else:
        extract(data, ["labeled", "test"], cache, ExtractOptions(**options))
        run_aggregates(cache, ["labeled", "test"], AggregateOptions(**AGG))
    train_neural(cache, root / "run", ["mlp", "vlad"],
                 NeuralOptions(n_folds=3, epochs=1, hidden=16, batch_size=16, n_heads=4, threads=1))
    stack(root / "run", root / "stack", StackOptions(n_rounds=10, top_k=3, compare=(), threads=1))
    return root


def test_predict_on_the_test_split_reproduces_the_submission(pipeline):
    out = pipeline / "pred_test.csv"
    predict(pipeline / "data", "test", pipeline / "run", pipeline / "stack", out)
    assert out.read_text() == (pipeline / "stack" / "submission.csv").read_text()
    assert (pipeline / "pred_test.csv.cache" / "test.h5").exists()     # its own cache, not the run's


def test_predict_on_the_labelled_split_reproduces_the_stored_pipeline(pipeline):
    out = pipeline / "pred_labeled.csv"
    predict(pipeline / "data", "labeled", pipeline / "run", pipeline / "stack", out,
            cache_dir=pipeline / "fresh")
    stored = schema.store_path(pipeline / "cache", "labeled")
    fresh = StoreReader(pipeline / "fresh" / "labeled.h5")
    for name in (schema.FRAME_EMB, schema.TEXT_POOLED, "agg/shift_stats", "agg/netvlad"):
        # the text encoder's float sums depend on the thread count, hence a float16-rounding tolerance
        np.testing.assert_allclose(fresh.read(name, slice(None)).astype(np.float32),
                                   StoreReader(stored).read(name, slice(None)).astype(np.float32), atol=2e-3)
    expected = pipeline / "expected_labeled.csv"
    probas = predict_store(pipeline / "run", stored, ["mlp", "vlad"])
    predict_from_probas(pipeline / "stack", probas, stored, StoreReader(stored).ids, expected)
    assert out.read_text() == expected.read_text()
    assert len(out.read_text().splitlines()) == 36


def test_predict_refuses_a_stack_from_another_run(pipeline, tmp_path):
    import shutil
    other = tmp_path / "stack"
    shutil.copytree(pipeline / "stack", other)
    meta = (other / "stack.json").read_text().replace('"fingerprint": "', '"fingerprint": "0')
    (other / "stack.json").write_text(meta)
    with pytest.raises(PredictError, match="fitted on another run"):
        predict(pipeline / "data", "test", pipeline / "run", other, tmp_path / "x.csv")
    with pytest.raises(PredictError, match="run's own cache"):
        predict(pipeline / "data", "test", pipeline / "run", pipeline / "stack", tmp_path / "y.csv",
                cache_dir=pipeline / "cache")
