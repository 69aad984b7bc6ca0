"""Grouped folds (`train-neural --groups FILE`, neural/folds.py): no group split across folds, stratified as far
as whole groups allow, the ungrouped folds unchanged, refusals naming the file and id, the stack's and a
teacher's use of the same folds, the command line."""
import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neural import outputs
from neural.folds import load_folds, make_folds
from neural.options import NeuralOptions
from neural.outputs import RunError
from neural.pipeline import draw_folds, train_neural
from run import cli
from stacking import pipeline as stack_pipeline
from stacking.pipeline import StackOptions, stack
from tests.fakes import TINY, write_fake_store

torch.set_num_threads(1)

N = 60
TINY = dict(TINY, epochs=2, batch_size=20, n_heads=4, threads=1, splits=())


def clip_groups(labels, size=2):
    """(N,) group of each video: per class, runs of `size` consecutive videos (one 'actor' each)."""
    groups = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        groups[rows] = [f"actor{c}_{i // size}" for i in range(len(rows))]
    return groups


def write_groups(path, ids, groups, header=True):
    path.write_text(("id,group\n" if header else "") + "".join(f"{v},{g}\n" for v, g in zip(ids, groups)))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A labelled store (6 classes x 10 videos), an unlabelled one and a groups file of 2-clip actors.
    -> (cache dir, ids (N,), labels (N,), groups (N,), groups file)."""
    d = tmp_path_factory.mktemp("cache")
    labels = write_fake_store(d / "labeled.h5", n=N)
    write_fake_store(d / "unlabeled.h5", n=30, split="unlabeled", labelled=False, seed=2)
    ids = np.array([f"labeled{i:05d}" for i in range(N)])
    groups = clip_groups(labels)
    return d, ids, labels, groups, write_groups(d / "groups.csv", ids, groups)


def run_opts(groups_file="", **extra):
    return NeuralOptions(**dict(TINY, groups=str(groups_file), **extra))


def test_no_group_is_split_across_folds_and_every_class_is_in_every_fold(cache):
    _, ids, labels, groups, groups_file = cache
    fold, info = draw_folds(ids, labels, run_opts(groups_file))
    assert len(info["sha256"]) == 64 and fold.min() == 0 and fold.max() == 2
    for g in np.unique(groups):
        assert len(np.unique(fold[groups == g])) == 1, g
    # 5 groups of 2 per class over 3 folds: each fold holds 1 or 2 of them, so 2 or 4 videos of each class
    counts = np.array([[np.sum((fold == k) & (labels == c)) for c in range(6)] for k in range(3)])
    assert counts.min() >= 2 and counts.max() <= 4, counts


def test_without_groups_the_folds_are_the_stratified_ones_of_before(cache, tmp_path):
    d, ids, labels, _, _ = cache
    fold, info = draw_folds(ids, labels, run_opts())
    assert info == {} and np.array_equal(fold, make_folds(labels, 3, 0))
    train_neural(d, tmp_path / "run", ["linear"], run_opts(epochs=1))
    assert np.array_equal(load_folds(tmp_path / "run" / "folds.h5")[1], make_folds(labels, 3, 0))
    with h5py.File(tmp_path / "run" / "folds.h5", "r") as h5:
        assert "grouped" not in h5.attrs and "groups_sha256" not in h5.attrs
    assert "groups" not in json.loads((tmp_path / "run" / "run.json").read_text())


def test_a_groups_file_missing_an_id_is_refused_naming_the_file_the_id_and_the_count(cache, tmp_path):
    d, ids, _, groups, _ = cache
    path = write_groups(tmp_path / "short.csv", list(ids[:7]) + list(ids[9:]) + ["elsewhere1"],
                        list(groups[:7]) + list(groups[9:]) + ["x"], header=False)
    with pytest.raises(RunError, match=r"short\.csv: 2 of 60 labelled ids have no group, the first "
                                       r"'labeled00007' \(1 other ids in the file, ignored\)"):
        train_neural(d, tmp_path / "run", ["linear"], run_opts(path))
    assert not (tmp_path / "run" / "folds.h5").exists()


def test_grouped_run_records_the_groups_and_a_resume_with_another_file_is_refused(cache, tmp_path):
    d, ids, _, groups, groups_file = cache
    run = tmp_path / "run"
    train_neural(d, run, ["linear"], run_opts(groups_file, epochs=1))
    with h5py.File(run / "folds.h5", "r") as h5:
        assert h5.attrs["grouped"] and len(h5.attrs["groups_sha256"]) == 64
        sha256 = h5.attrs["groups_sha256"]
    record = json.loads((run / "run.json").read_text())
    assert record["groups"] == {"path": str(groups_file.resolve()), "sha256": sha256}
    train_neural(d, run, ["linear"], run_opts(groups_file, epochs=1))           # the same file resumes
    other = write_groups(tmp_path / "other.csv", ids, clip_groups(np.zeros(N, int), size=5))
    with pytest.raises(RunError, match=r"folds were drawn with groups file sha256 .*other\.csv"):
        train_neural(d, run, ["linear"], run_opts(other, epochs=1))
    with pytest.raises(RunError, match="no groups"):
        train_neural(d, run, ["linear"], run_opts("", epochs=1))


def test_a_class_of_one_group_is_left_out_of_a_fold_models_training_and_the_run_still_works(cache, tmp_path):
    d, ids, labels, groups, _ = cache
    lone = groups.copy()
    lone[labels == 0] = "one_actor"                     # class 0: a single group, so one fold holds all of it
    path = write_groups(tmp_path / "lone.csv", ids, lone)
    metrics = train_neural(d, tmp_path / "run", ["linear"], run_opts(path, epochs=1))
    _, fold, _, _ = load_folds(tmp_path / "run" / "folds.h5")
    assert len(np.unique(fold[labels == 0])) == 1
    oof, _ = outputs.read_oof(tmp_path / "run" / "linear" / "predictions.h5")
    assert oof.shape == (N, 6) and np.isfinite(oof).all() and 0 <= metrics["linear"]["oof"]["mean"] <= 1


def test_the_stack_cross_validates_on_the_runs_grouped_folds(cache, tmp_path, monkeypatch):
    d, _, _, _, groups_file = cache
    run = tmp_path / "run"
    train_neural(d, run, ["linear", "knn"], run_opts(groups_file, epochs=1, params={"knn.k": 5, "knn.dim": 8}))
    seen = []
    real = stack_pipeline.oof_proba

    def spy(stacker, X, y, fold, desc=None):
        seen.append(np.array(fold))
        return real(stacker, X, y, fold, desc)

    monkeypatch.setattr(stack_pipeline, "oof_proba", spy)
    stack(run, tmp_path / "stack", StackOptions(threads=1, stacker="logreg", compare=(), split=""))
    _, fold, _, _ = load_folds(run / "folds.h5")
    assert seen and np.array_equal(seen[0], fold)       # the outer pass: exactly the run's grouped folds


def test_a_grouped_teacher_teaches_a_student_with_the_same_groups_only(cache, tmp_path):
    d, ids, _, _, groups_file = cache
    train_neural(d, tmp_path / "teacher", ["linear"], run_opts(groups_file, epochs=1))
    student = run_opts(groups_file, epochs=1, teacher=str(tmp_path / "teacher"), pseudo_finetune_epochs=0)
    metrics = train_neural(d, tmp_path / "student", ["linear"], student)
    assert 0 <= metrics["linear"]["oof"]["mean"] <= 1
    assert np.array_equal(load_folds(tmp_path / "student" / "folds.h5")[1],
                          load_folds(tmp_path / "teacher" / "folds.h5")[1])
    with pytest.raises(RunError, match="teacher's folds are not this run's"):
        train_neural(d, tmp_path / "ungrouped", ["linear"], run_opts("", epochs=1, teacher=str(tmp_path / "teacher"),
                                                                     pseudo_finetune_epochs=0))


def test_groups_from_the_command_line(cache, tmp_path):
    d, _, _, groups, groups_file = cache
    run = tmp_path / "run"
    args = ["train-neural", "--cache", str(d), "--out", str(run), "--models", "linear", "--folds", "3",
            "--epochs", "1", "--hidden", "16", "--threads", "1", "--groups", str(groups_file)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    _, fold, _, _ = load_folds(run / "folds.h5")
    assert all(len(np.unique(fold[groups == g])) == 1 for g in np.unique(groups))
    missing = write_groups(tmp_path / "missing.csv", [], [])
    result = CliRunner().invoke(cli, args[:4] + [str(tmp_path / "run2")] + args[5:-1] + [str(missing)])
    assert result.exit_code != 0 and "missing.csv: 60 of 60 labelled ids have no group" in result.output
    assert "Traceback" not in result.output
