"""The demo through the real CLI: `run.py demo --tiny` generates data, then extract -> train-neural -> stack
-> package -> predict from the model directory, on the CPU, on one thread, in the default test run (under a
minute of CPU: two trainings). The default size and `--size full` differ only in DemoOptions' numbers."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from demo import DemoError
from demo.run import DemoOptions, accuracy_by_kind, predict_like_submission, run_demo, score_submission
from features.categories import load_category_map
from neural.models import DEFAULT_MODELS
from run import cli


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(cli, ["demo", "--tiny", "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "demo.json").read_text()), result.output


def test_tiny_is_the_smallest_demo_three_folds_allow(tmp_path):
    tiny = DemoOptions.tiny()
    assert (tiny.n_folds, tiny.tail_ratio, tiny.frames) == (3, 1.0, 2)
    assert tiny.n_labelled == 14 * 6                     # 14 classes; the generator's floor is n_folds + 1 = 4
    smaller = DemoOptions(**{**tiny.__dict__, "n_labelled": 14 * 3})
    with pytest.raises(DemoError, match="n_labelled=42.*3-fold CV needs 4"):
        run_demo(tmp_path / "out", options=smaller, echo=lambda _: None)
    assert not (tmp_path / "out" / "cache").exists()


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


def test_metrics_has_every_model_and_the_stack_beats_chance(tiny_demo):
    out, summary, text = tiny_demo
    metrics = json.loads((out / "stack" / "metrics.json").read_text())
    table, chosen = metrics["table"], metrics["stacker"]
    assert {f"base:{m}" for m in DEFAULT_MODELS} <= set(table)
    assert {"average", "rerank", "logreg", f"{chosen}+reweight"} <= set(table)
    assert chosen == "rerank" and "auto" not in metrics and "auto: chose" not in text     # the default stacker
    # 14 classes: chance l2 micro-F1 is ~0.07 (0.16 for always predicting the largest class)
    assert table[chosen]["l2_micro"] > 0.3
    assert table[chosen]["l1_micro"] > 0.5            # 4 coarse classes
    for name in ("base:mlp", "average", f"{chosen}+reweight"):    # the printed table is metrics.json's
        assert f"{name} " in text and f"{table[name]['mean']:.4f}" in text


def test_per_kind_table_covers_every_kind_and_model(tiny_demo):
    _, summary, text = tiny_demo
    kinds = summary["kinds"]
    assert set(kinds["chance_within_kind"]) == {"text-only", "frame-only", "order", "mix"}
    assert set(kinds["test"]) == {*DEFAULT_MODELS, "average", "stack (submission)"}
    assert set(kinds["oof"]) == {*DEFAULT_MODELS, "average"}
    # text classes are the easiest (keywords in 90% of titles); a blind guess is right 1 time in 14 and
    # knowing only that a video is text-only 1 time in 4
    assert kinds["oof"]["average"]["text-only"] > 0.4
    assert "accuracy by kind" in text and "submission on the test split" in text


def test_demo_packages_the_model_directory_and_prints_where_it_is(tiny_demo):
    out, summary, text = tiny_demo
    model = out / "stack" / "model"
    assert summary["outputs"]["model"] == str(model)
    assert f"model          {model}" in text
    manifest = json.loads((model / "manifest.json").read_text())
    assert {"model.json", "stack/stack.json", "stack/reweight.json"} <= set(manifest["files"])


def test_the_second_run_learns_from_the_unlabelled_split_and_the_table_shows_both(tiny_demo):
    out, summary, output = tiny_demo
    teacher = json.loads((out / "run_labelled" / "run.json").read_text())
    student = json.loads((out / "run" / "run.json").read_text())
    assert teacher["options"]["teacher"] == "" and not teacher["options"]["pretrain"]
    assert Path(student["options"]["teacher"]) == out / "run_labelled" and student["options"]["pretrain"]
    assert student["pseudo"]["unlabelled"]["split"] == "unlabeled"
    assert {"single", "dual", "cross"} <= set(student["pretrained"])
    assert all(p["stores"]["unlabeled"] == DemoOptions.tiny().n_unlabelled for p in student["pretrained"].values())
    gain = summary["unlabelled"]
    models = json.loads((out / "stack" / "metrics.json").read_text())["table"]
    assert {f"base:{m}" for m in student["models"]} | {"average"} <= set(gain["oof"]) <= set(models)
    for name, (without, with_) in gain["oof"].items():      # each row scored from its own run
        assert 0 <= without <= 1 and 0 <= with_ <= 1
        assert with_ == models[name]["mean"]
    assert set(gain["test"]["with"]) == set(gain["test"]["without"]) >= {"average", "submission"}
    assert gain["test"]["with"]["submission"] == summary["test"]["mean"]
    assert "without / with the unlabelled split" in output


def test_rerun_resumes_without_retraining(tiny_demo):
    out, summary, _ = tiny_demo
    again = run_demo(out, options=DemoOptions(**summary["options"]), echo=lambda _: None)
    assert again["table"] == summary["table"]
    for stage in ("train-neural (labelled only)", "train-neural"):       # the teacher run, then the student run
        assert again["cpu_s"][stage] < max(2.0, summary["cpu_s"][stage] / 3)


def test_score_submission_refuses_a_submission_missing_videos(tiny_demo, tmp_path):
    out, _, _ = tiny_demo
    lines = (out / "stack" / "submission.csv").read_text().splitlines()
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DemoError, match="no prediction for test video"):
        score_submission(out / "data", partial, out / "data" / "category_map.csv")


def test_predict_from_the_model_directory_gives_the_submission_and_says_so(tiny_demo):
    out, summary, text = tiny_demo
    predicted = out / "predict" / "test.csv"
    assert summary["predict"] == {"file": str(predicted), "n_videos": 14}
    assert predicted.read_text() == (out / "stack" / "submission.csv").read_text()
    assert f"14 test videos -> {predicted}; every label equals the stack's" in text
    assert f"predict        {predicted}" in text                 # in the lines saying where to look


def test_a_predict_that_differs_from_the_submission_is_an_error(tiny_demo, tmp_path):
    out, _, _ = tiny_demo
    lines = (out / "stack" / "submission.csv").read_text().splitlines()
    vid, label = lines[0].split(",")
    other = next(r.split(",")[1] for r in lines if r.split(",")[1] != label)
    changed = tmp_path / "submission.csv"
    changed.write_text("\n".join([f"{vid},{other}", *lines[1:]]) + "\n")
    with pytest.raises(DemoError, match=f"differ from .* on 1 of 14 test videos \\(first: video {vid}"):
        predict_like_submission(out / "data", out / "stack" / "model", tmp_path / "predict", changed)


def test_sizes_small_is_the_default_full_the_earlier_scale_and_tiny_the_flag(tmp_path):
    assert DemoOptions.sized("small") == DemoOptions()
    full = DemoOptions.sized("full")
    assert (full.n_labelled, full.n_unlabelled, full.n_test, full.frames, full.n_folds, full.epochs) == \
        (400, 1200, 150, 8, 5, 6)
    small = DemoOptions()
    assert small.n_labelled * small.frames < full.n_labelled * full.frames and small.n_folds == 3
    assert DemoOptions.sized("tiny") == DemoOptions.tiny()
    with pytest.raises(DemoError, match="size 'huge'"):
        DemoOptions.sized("huge")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "out"), "--tiny", "--size", "full"])
    assert result.exit_code != 0 and "--tiny is --size tiny" in result.output
    assert not (tmp_path / "out").exists()


def test_two_folds_are_refused_before_any_work(tmp_path):
    with pytest.raises(DemoError, match="n_folds=2"):
        run_demo(tmp_path / "out", options=DemoOptions(n_folds=2), echo=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_demo_cli_options_of_the_generated_data_are_refused_alone(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "out"), "--split", "test"])
    assert result.exit_code != 0 and "--split go with --data" in result.output
    assert not (tmp_path / "out").exists()


def test_accuracy_by_kind_counts_only_the_kinds_videos():
    kinds = np.array(["a", "a", "b"])
    label = np.array([0, 1, 2, 2])
    pred = np.array([0, 0, 2, 1])
    assert accuracy_by_kind(label, pred, kinds) == {"a": 0.5, "b": 0.5}
