"""The stack as teacher (stacking/teach.py, `stack --teach`; read by neural/pseudo.py): out-of-fold honest on a
planted duplicate, and the test can fail: pseudo-labels from a stacker fitted on all folds leak. Records,
refusals and the clearing of stale teacher files."""
import json

import h5py
import numpy as np
import pytest
import torch
from sklearn.base import clone

from neural import outputs
from neural.folds import load_folds
from neural.options import NeuralOptions
from neural.outputs import RunError
from neural.pipeline import train_neural
from neural.pseudo import STACKED_LABELS, pseudo_path, read_pseudo_record
from stacking import teach as teach_module
from stacking.pipeline import StackOptions, stack
from stacking.rundir import RunDirError
from tests.fakes import write_fake_store

torch.set_num_threads(1)

N = 60
# a linear model with no regularisation memorises 40 random-feature videos in 12 epochs (as test_neural_pseudo)
MEMORISE = dict(n_folds=3, epochs=12, batch_size=20, lr=3e-2, hidden=16, n_heads=4, dropout=0.0, weight_decay=0.0,
                class_balanced=False, threads=1, splits=())
STUDENT = dict(MEMORISE, pseudo_threshold=0.0, pseudo_finetune_epochs=0)     # every pseudo-label, no wash-out
# a LightGBM stacker that memorises its training rows: fitted on every fold it knows fold k's OOF inputs
LGBM_MEMORISE = {"n_rounds": 150, "learning_rate": 0.3, "num_leaves": 63, "min_data_in_leaf": 1,
                 "feature_fraction": 1.0, "lambda_l2": 0.0, "max_bin": 255}
STACK = dict(stacker="lgbm", compare=(), params=LGBM_MEMORISE, split="", label_shift="none", decode=False,
             teach="unlabeled")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Labels without signal, an unlabelled split holding an exact copy of every labelled video (same seed:
    same features, other ids, no labels), a teacher run of memorising linear models and its stack made with
    --teach unlabeled. -> (cache dir, run dir, stack dir, labels (N,))."""
    d = tmp_path_factory.mktemp("planted_stack")
    labels = write_fake_store(d / "labeled.h5", n=N, signal=0.0)
    write_fake_store(d / "unlabeled.h5", n=N, split="unlabeled", labelled=False, signal=0.0)
    write_fake_store(d / "other.h5", n=N, split="other", labelled=False, signal=0.0, seed=5)
    train_neural(d, d / "run", ["linear"], NeuralOptions(**MEMORISE))
    stack(d / "run", d / "stack", StackOptions(**STACK))
    return d, d / "run", d / "stack", labels


def teacher_argmax(folder, n_folds):
    """{fold k: argmax (N_unlab,) of the fold-k pseudo-label file under folder}."""
    out = {}
    for k in range(n_folds):
        with h5py.File(pseudo_path(folder, k), "r") as h5:
            out[k] = h5["proba"][:].astype(np.float32).argmax(1)
    return out


def oof_accuracy(run_dir, labels):
    oof, _ = outputs.read_oof(run_dir / "linear" / "predictions.h5")
    return float((oof.argmax(1) == labels).mean())


def student(cache, teacher, out, **extra):
    return train_neural(cache, out, ["linear"], NeuralOptions(**dict(STUDENT, teacher=str(teacher), **extra)))


def test_stack_teacher_stays_at_chance_on_planted_duplicates_and_an_all_folds_stacker_would_leak(
        planted, tmp_path, monkeypatch):
    cache, run, stack_dir, labels = planted
    fold = load_folds(run / "folds.h5")[1]
    honest = teacher_argmax(stack_dir, 3)
    for k in range(3):               # fold k's stacker never saw fold k's rows: chance (1/6) on their copies
        assert (honest[k][fold == k] == labels[fold == k]).mean() < 0.45
    student(cache, stack_dir, tmp_path / "honest")
    honest_acc = oof_accuracy(tmp_path / "honest", labels)
    assert honest_acc < 0.4, honest_acc
    # the student's pseudo-labels are the stack's, byte for byte the same proba
    for k in range(3):
        with h5py.File(pseudo_path(tmp_path / "honest", k), "r") as a, h5py.File(pseudo_path(stack_dir, k), "r") as b:
            assert np.array_equal(a["proba"][:], b["proba"][:])

    # dishonest: every fold's stacker fitted on all folds' OOF rows, fold k's own included
    monkeypatch.setattr(teach_module, "fold_stacker", lambda stacker, X, y, fold_, k: clone(stacker).fit(X, y))
    stack(run, tmp_path / "leaky_stack", StackOptions(**STACK))
    leaky = teacher_argmax(tmp_path / "leaky_stack", 3)
    for k in range(3):
        assert (leaky[k][fold == k] == labels[fold == k]).mean() > 0.8
    student(cache, tmp_path / "leaky_stack", tmp_path / "leaky")
    leaky_acc = oof_accuracy(tmp_path / "leaky", labels)
    assert leaky_acc > 0.6 and leaky_acc > honest_acc + 0.3, (honest_acc, leaky_acc)


def test_records_name_the_per_fold_stackers_and_another_unlabelled_store_is_refused(planted, tmp_path):
    cache, run, stack_dir, _ = planted
    record = read_pseudo_record(pseudo_path(stack_dir, 1))
    assert record["fold"] == 1 and record["teacher"]["labels"] == STACKED_LABELS
    assert record["stacker"]["kind"] == "lgbm" and record["stacker"]["n_rows"] == int((load_folds(
        run / "folds.h5")[1] != 1).sum())
    assert record["unlabelled"]["split"] == "unlabeled" and record["unlabelled"]["n_videos"] == N
    metrics = json.loads((stack_dir / "metrics.json").read_text())
    assert metrics["teach"]["split"] == "unlabeled" and len(metrics["teach"]["folds"]) == 3
    with pytest.raises(RunError, match=r"fold0.h5: field 'unlabelled': made from split 'unlabeled'.*"
                                       r"--unlabeled unlabeled or run `stack --teach other`"):
        student(cache, stack_dir, tmp_path / "other", unlabeled="other")
    student(cache, stack_dir, tmp_path / "run", epochs=1)
    pseudo = json.loads((tmp_path / "run" / "run.json").read_text())["pseudo"]
    assert pseudo["teacher"]["labels"] == STACKED_LABELS and pseudo["teacher"]["kind"] == "stack"


def test_a_stack_refitted_without_teach_leaves_no_stale_teacher_files_and_teaches_through_its_base_models(
        planted, tmp_path):
    cache, run, _, _ = planted
    out = tmp_path / "stack"
    stack(run, out, StackOptions(**STACK))
    assert pseudo_path(out, 2).exists()
    stack(run, out, StackOptions(**dict(STACK, teach="")))
    assert not (out / "pseudo").exists()
    student(cache, out, tmp_path / "run", epochs=1)
    teacher = json.loads((tmp_path / "run" / "run.json").read_text())["pseudo"]["teacher"]
    assert teacher["kind"] == "stack" and "labels" not in teacher        # the base models' fold models


def test_teach_names_a_missing_split_before_fitting(planted, tmp_path):
    _, run, _, _ = planted
    with pytest.raises(RunError, match=r"nowhere.h5: no store for the unlabelled split 'nowhere'"):
        stack(run, tmp_path / "s", StackOptions(**dict(STACK, teach="nowhere")))
    assert not (tmp_path / "s").exists()


def test_the_command_line_teaches_and_says_where(planted, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from inference import package
    from run import cli
    _, run, _, _ = planted        # the fake store has no encoder identity to package: the stack alone
    monkeypatch.setattr(package, "stack_and_package", lambda r, o, opts: (stack(r, o, opts), f"{o}/model"))
    out = tmp_path / "stack"
    result = CliRunner().invoke(cli, ["stack", "--run", str(run), "--out", str(out), "--stacker", "average",
                                      "--compare", "", "--split", "", "--teach", "unlabeled"])
    assert result.exit_code == 0, result.output
    assert f"teacher: pseudo-labels of unlabeled ({N} videos) by per-fold stackers -> {out}/pseudo/fold<k>.h5" \
        in result.output
    assert json.loads((out / "stack.json").read_text())["options"]["teach"] == "unlabeled"
    assert all(pseudo_path(out, k).exists() for k in range(3))


def test_teach_refuses_a_run_without_its_fold_models_naming_the_file(planted, tmp_path):
    import shutil
    _, run, _, _ = planted
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "linear" / "fold1.safetensors").unlink()
    with pytest.raises(RunDirError, match=r"fold1.safetensors: the fold 1 model of 'linear' is missing"):
        stack(copy, tmp_path / "s", StackOptions(**STACK))
    assert not (tmp_path / "s").exists()
