"""The demo through the real pipeline: generated data -> extract -> train-neural -> stack, tiny and on the CPU."""
import csv
import json

import pytest
import torch

from features.categories import load_category_map
from neural.options import MODEL_NAMES
from demo.run import DemoOptions, accuracy_by_kind, run_demo, score_submission


# ~35 s of CPU, but 4-5 minutes of wall time on the shared 2-core machine (extract of 300 frames waits for
# the CPU); the full-size `python run.py demo` (bench/README.md) covers the same path.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo")
    # the fewest videos the generator allows (6 of each of 14 classes), 3 frames each: extract dominates
    options = DemoOptions(n_labelled=84, n_unlabelled=2, n_test=14, n_frames=4, image_size=32, tail_ratio=1.0,
                          frames=3, max_tokens=16, pca_dim=8, n_clusters=4, n_gmm=2, workers=0, n_folds=3,
                          epochs=4, hidden=16, threads=1, extra={"lr": 3e-3})
    lines = []
    summary = run_demo(out, options=options, echo=lines.append)
    return out, summary, "\n".join(lines)


@slow
def test_submission_has_one_line_per_test_video_with_mapped_classes(tiny_demo):
    out, summary, _ = tiny_demo
    data = out / "data"
    test_ids = [v["id"] for v in json.loads((data / "annotations" / "test.json").read_text())]
    with open(out / "stack" / "submission.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert sorted(r[0] for r in rows) == sorted(test_ids)
    assert all(len(r) == 2 for r in rows)
    known = set(load_category_map(data / "category_map.csv").fine_ids)
    assert {r[1] for r in rows} <= known
    assert summary["test"]["n_videos"] == len(test_ids) == 14


@slow
def test_metrics_has_every_model_and_the_stack_beats_chance(tiny_demo):
    out, summary, text = tiny_demo
    table = json.loads((out / "stack" / "metrics.json").read_text())["table"]
    assert {f"base:{m}" for m in MODEL_NAMES} <= set(table)
    assert {"average", "rerank", "rerank+reweight"} <= set(table)
    # 14 classes: chance l2 micro-F1 is ~0.07 (0.16 for always predicting the largest class)
    assert table["rerank"]["l2_micro"] > 0.3
    assert table["rerank"]["l1_micro"] > 0.5            # 4 coarse classes
    for name in ("base:mlp", "average", "rerank+reweight"):    # the printed table is metrics.json's
        assert f"{name} " in text and f"{table[name]['mean']:.4f}" in text


@slow
def test_per_kind_table_covers_every_kind_and_model(tiny_demo):
    _, summary, text = tiny_demo
    kinds = summary["kinds"]
    assert set(kinds["chance_within_kind"]) == {"text-only", "frame-only", "order", "mix"}
    assert set(kinds["test"]) == {*MODEL_NAMES, "average", "stack (submission)"}
    assert set(kinds["oof"]) == {*MODEL_NAMES, "average"}
    # text classes are the easiest (keywords in 90% of titles); a blind guess is right 1 time in 14 and
    # knowing only that a video is text-only 1 time in 4
    assert kinds["oof"]["average"]["text-only"] > 0.4
    assert "accuracy by kind" in text and "submission on the test split" in text


def test_two_folds_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="n_folds=2"):
        run_demo(tmp_path / "out", options=DemoOptions(n_folds=2), echo=lambda _: None)
    assert not (tmp_path / "out").exists()


@slow
def test_rerun_resumes_without_retraining(tiny_demo):
    out, summary, _ = tiny_demo
    options = DemoOptions(**summary["options"])
    again = run_demo(out, options=options, echo=lambda _: None)
    assert again["table"] == summary["table"]
    assert again["times_s"]["train-neural"] < max(2.0, summary["times_s"]["train-neural"] / 3)


def test_accuracy_by_kind_counts_only_the_kinds_videos():
    import numpy as np
    kinds = np.array(["a", "a", "b"])
    label = np.array([0, 1, 2, 2])
    pred = np.array([0, 0, 2, 1])
    assert accuracy_by_kind(label, pred, kinds) == {"a": 0.5, "b": 0.5}


@slow
def test_score_submission_refuses_a_submission_missing_videos(tiny_demo, tmp_path):
    out, _, _ = tiny_demo
    lines = (out / "stack" / "submission.csv").read_text().splitlines()
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="no prediction for test video"):
        score_submission(out / "data", partial, out / "data" / "category_map.csv")
