"""Pseudo-label distillation (neural/pseudo.py) on tiny fake stores: out-of-fold honest on a planted
duplicate (and the test can fail: a teacher from the wrong fold leaks), resumable, refusals, the
labelled-only path unchanged, the command line."""
import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neural import outputs, pseudo
from neural.folds import load_folds
from neural.options import NeuralOptions
from neural.outputs import RunError
from neural.pipeline import train_neural
from run import cli
from tests.fakes import write_fake_store

torch.set_num_threads(1)

N = 60
# a linear model with no regularisation memorises 40 random-feature videos in 12 epochs
MEMORISE = dict(n_folds=3, epochs=12, batch_size=20, lr=3e-2, hidden=16, n_heads=4, dropout=0.0, weight_decay=0.0,
                class_balanced=False, threads=1, splits=())
STUDENT = dict(MEMORISE, pseudo_threshold=0.0, pseudo_finetune_epochs=0)     # every pseudo-label, no wash-out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Labels without signal (features are noise, labels random) and an unlabelled split holding an exact
    copy of every labelled video (same seed: same features, other ids, no labels); a teacher run of linear
    models that memorise their training rows. -> (cache dir, teacher run dir, labels (N,))."""
    d = tmp_path_factory.mktemp("planted")
    labels = write_fake_store(d / "labeled.h5", n=N, signal=0.0)
    write_fake_store(d / "unlabeled.h5", n=N, split="unlabeled", labelled=False, signal=0.0)
    train_neural(d, d / "teacher", ["linear"], NeuralOptions(**MEMORISE))
    return d, d / "teacher", labels


def oof_accuracy(run_dir, labels, model="linear"):
    oof, _ = outputs.read_oof(run_dir / model / "predictions.h5")
    return float((oof.argmax(1) == labels).mean())


def test_planted_duplicates_stay_at_chance_and_a_teacher_from_the_wrong_fold_would_leak(planted, tmp_path,
                                                                                         monkeypatch):
    cache, teacher, labels = planted
    _, fold, n_folds, _ = load_folds(teacher / "folds.h5")
    _student(cache, teacher, tmp_path / "honest")
    # the teacher memorised: its fold-k models know the copies of other folds' rows, not of fold k's own
    ids, argmax = pseudo.pseudo_argmax(tmp_path / "honest", n_folds)
    assert len(ids) == N
    for k in range(n_folds):
        assert (argmax[k][0][fold != k] == labels[fold != k]).mean() > 0.8
        assert (argmax[k][0][fold == k] == labels[fold == k]).mean() < 0.45
    honest = oof_accuracy(tmp_path / "honest", labels)
    assert honest < 0.4, honest                         # chance is 1/6: no label reached its own fold

    real_load = pseudo.load_fold                        # dishonest: fold k pseudo-labelled by fold k+1's models
    monkeypatch.setattr(pseudo, "load_fold", lambda d, k, device="cpu": real_load(d, (k + 1) % n_folds, device))
    _student(cache, teacher, tmp_path / "leaky")
    leaky = oof_accuracy(tmp_path / "leaky", labels)
    assert leaky > 0.6 and leaky > honest + 0.3, (honest, leaky)


def _student(cache, teacher, out, models=("linear",), **extra):
    return train_neural(cache, out, list(models), NeuralOptions(**dict(STUDENT, teacher=str(teacher), **extra)))


def test_the_frame_probe_fits_pseudo_labels_and_stays_honest(planted, tmp_path, monkeypatch):
    """frames is solved when its fold starts, not by the loop: its student fit adds the confident
    pseudo-labelled rows to the probe. Honest teacher: chance; fold k+1's teacher: the copies leak, so
    the test can fail."""
    cache, teacher, labels = planted
    n_folds = load_folds(teacher / "folds.h5")[2]
    _student(cache, teacher, tmp_path / "honest", models=("frames",), pseudo_weight=5.0)
    honest = oof_accuracy(tmp_path / "honest", labels, "frames")
    info = json.loads((tmp_path / "honest" / "frames" / "fold0.json").read_text())["info"]
    assert info["pseudo"]["rows"] == N and honest < 0.3, honest      # chance 1/6
    real_load = pseudo.load_fold
    monkeypatch.setattr(pseudo, "load_fold", lambda d, k, device="cpu": real_load(d, (k + 1) % n_folds, device))
    _student(cache, teacher, tmp_path / "leaky", models=("frames",), pseudo_weight=5.0)
    leaky = oof_accuracy(tmp_path / "leaky", labels, "frames")
    # the probe's L2 term keeps it from memorising noise outright (weight 5: the copies count 5x); measured
    # 0.12 honest against 0.47 leaky
    assert leaky > honest + 0.25, (honest, leaky)


def test_records_say_which_teacher_and_unlabelled_store_each_model_saw(planted, tmp_path):
    cache, teacher, _ = planted
    _student(cache, teacher, tmp_path / "run")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["options"]["teacher"] == str(teacher.resolve())
    assert run["pseudo"]["teacher"]["models"] == ["linear"] and run["pseudo"]["teacher"]["kind"] == "run"
    assert run["pseudo"]["unlabelled"]["split"] == "unlabeled" and run["pseudo"]["unlabelled"]["n_videos"] == N
    with h5py.File(tmp_path / "run" / "linear" / "predictions.h5", "r") as h5:
        assert json.loads(h5.attrs["options"])["pseudo"] == run["pseudo"]
    record = pseudo.read_pseudo_record(pseudo.pseudo_path(tmp_path / "run", 0))
    assert record["fold"] == 0 and record["teacher"] == run["pseudo"]["teacher"]
    assert record["unlabelled"]["digest"] == run["pseudo"]["unlabelled"]["digest"]
    info = json.loads((tmp_path / "run" / "linear" / "fold0.json").read_text())["info"]
    assert info["pseudo"]["rows"] == N                  # threshold 0: every unlabelled row


def test_a_run_killed_after_fold_0s_pseudo_labels_resumes_to_the_same_result(planted, tmp_path, monkeypatch):
    cache, teacher, labels = planted
    _student(cache, teacher, tmp_path / "straight")
    straight, _ = outputs.read_oof(tmp_path / "straight" / "linear" / "predictions.h5")

    made, real_proba = [], pseudo.teacher_proba

    def killed_in_fold_1(teacher_, k, *args):
        made.append(k)
        if k == 1:
            raise KeyboardInterrupt("killed")
        return real_proba(teacher_, k, *args)

    monkeypatch.setattr(pseudo, "teacher_proba", killed_in_fold_1)
    with pytest.raises(KeyboardInterrupt):
        _student(cache, teacher, tmp_path / "resumed")
    assert pseudo.pseudo_path(tmp_path / "resumed", 0).exists()
    assert not pseudo.pseudo_path(tmp_path / "resumed", 1).exists()
    assert not list((tmp_path / "resumed" / "pseudo").glob("*.tmp"))         # nothing half-written
    made.clear()
    monkeypatch.setattr(pseudo, "teacher_proba", lambda *a: made.append(a[1]) or real_proba(*a))
    _student(cache, teacher, tmp_path / "resumed")
    assert made == [1, 2]                               # fold 0's pseudo-labels were reused
    resumed, _ = outputs.read_oof(tmp_path / "resumed" / "linear" / "predictions.h5")
    np.testing.assert_array_equal(resumed, straight)


def test_a_teacher_with_other_folds_or_another_store_is_refused_naming_why(planted, tmp_path):
    cache, teacher, _ = planted
    quick = dict(MEMORISE, epochs=1)
    train_neural(cache, tmp_path / "seed1", ["linear"], NeuralOptions(**dict(quick, seed=1)))
    with pytest.raises(RunError, match=r"folds.h5: the teacher's folds are not this run's \(seed 1 \(teacher\) vs 0"):
        _student(cache, tmp_path / "seed1", tmp_path / "a")
    other = tmp_path / "other"
    other.mkdir()
    write_fake_store(other / "labeled.h5", n=N - 15, signal=0.0)
    train_neural(other, tmp_path / "small", ["linear"], NeuralOptions(**quick))
    with pytest.raises(RunError, match="45 labelled videos \\(teacher\\) vs 60"):
        _student(cache, tmp_path / "small", tmp_path / "b")
    write_fake_store(other / "labeled.h5", n=N, signal=0.0)          # the same ids from another store
    with h5py.File(other / "labeled.h5", "r+") as h5:
        h5.attrs["config"] = json.dumps({"fake": "another encoder"})
    train_neural(other, tmp_path / "other_store", ["linear"], NeuralOptions(**quick))
    with pytest.raises(RunError, match="store_config.*another labelled store.*fake"):
        _student(cache, tmp_path / "other_store", tmp_path / "c")
    with pytest.raises(RunError, match="neither a train-neural run directory"):
        _student(cache, tmp_path, tmp_path / "d")
    with pytest.raises(RunError, match=r"nowhere.h5: no store for the unlabelled split 'nowhere'"):
        _student(cache, teacher, tmp_path / "e", unlabeled="nowhere")
    assert not (tmp_path / "e").exists()                # refused before anything was written
    with pytest.raises(RunError, match=r"nowhere.h5: no store"):                 # even without a teacher
        train_neural(cache, tmp_path / "e", ["linear"], NeuralOptions(**dict(MEMORISE, unlabeled="nowhere")))
    _student(cache, teacher, tmp_path / "f")
    with pytest.raises(RunError, match="teacher"):      # a resumed run may not change its teacher
        _student(cache, tmp_path / "seed1", tmp_path / "f")


def test_without_a_teacher_the_pseudo_options_change_nothing(planted, tmp_path):
    """The labelled-only path is bit-exact whatever the pseudo options (nothing extra drawn or computed)."""
    cache, _, _ = planted
    opts = dict(MEMORISE, epochs=3)
    train_neural(cache, tmp_path / "plain", ["linear"], NeuralOptions(**opts))
    train_neural(cache, tmp_path / "set", ["linear"], NeuralOptions(**dict(
        opts, unlabeled="unlabeled", pseudo_weight=3.0, pseudo_temperature=4.0, pseudo_threshold=0.9,
        pseudo_ratio=2.0, pseudo_finetune_epochs=2, pseudo_modality_drop=0.5)))
    plain, _ = outputs.read_oof(tmp_path / "plain" / "linear" / "predictions.h5")
    other, _ = outputs.read_oof(tmp_path / "set" / "linear" / "predictions.h5")
    np.testing.assert_array_equal(plain, other)
    assert not (tmp_path / "set" / "pseudo").exists()


def test_the_command_line_takes_a_stack_dir_as_teacher_and_says_which_unlabelled_split(planted, tmp_path):
    cache, teacher, _ = planted
    stack_dir = tmp_path / "stack"                      # what `stack` records: the run and the models it stacked
    stack_dir.mkdir()
    (stack_dir / "stack.json").write_text(json.dumps({"run_dir": str(teacher), "models": ["linear"]}))
    result = CliRunner().invoke(cli, [
        "train-neural", "--cache", str(cache), "--out", str(tmp_path / "run"), "--models", "linear",
        "--folds", "3", "--epochs", "2", "--batch-size", "20", "--hidden", "16", "--threads", "1",
        "--teacher", str(stack_dir), "--unlabeled", "unlabeled", "--pseudo-weight", "0.5",
        "--pseudo-temperature", "3", "--pseudo-threshold", "0.2", "--pseudo-ratio", "0.5",
        "--pseudo-finetune-epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "unlabelled split: unlabeled (unlabeled.h5, named by --unlabeled), used for pseudo-labels" in result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["pseudo"]["teacher"]["kind"] == "stack" and run["pseudo"]["teacher"]["run_dir"] == str(teacher.resolve())
    assert {k: run["options"][k] for k in ("pseudo_weight", "pseudo_temperature", "pseudo_threshold",
                                           "pseudo_ratio", "pseudo_finetune_epochs")} == \
        {"pseudo_weight": 0.5, "pseudo_temperature": 3.0, "pseudo_threshold": 0.2, "pseudo_ratio": 0.5,
         "pseudo_finetune_epochs": 1}
    info = json.loads((tmp_path / "run" / "linear" / "fold0.json").read_text())["info"]
    assert len(info["epoch_loss"]) == 3                 # 2 epochs with pseudo-labels, 1 labelled only
    missing = CliRunner().invoke(cli, ["train-neural", "--cache", str(cache), "--out", str(tmp_path / "x"),
                                       "--models", "linear", "--unlabeled", "nowhere"])
    assert missing.exit_code != 0 and "nowhere.h5: no store for the unlabelled split" in missing.output


def test_pseudo_batches_are_confident_class_balanced_seeded_and_carry_their_rows_targets(tmp_path):
    write_fake_store(tmp_path / "unlabeled.h5", n=40, split="unlabeled", labelled=False)
    proba = np.full((40, 6), 0.02, np.float32)
    proba[:30, 0] = proba[30:38, 1] = 0.9                  # a head class, a tail class (teacher argmax)
    proba[38:, 2] = 0.3                                    # not confident enough: never drawn
    path = tmp_path / "fold0.h5"
    with h5py.File(path, "w") as h5:
        h5["proba"] = proba.astype(np.float16)
    from features.store import StoreReader
    from neural.models import model_inputs
    reader = StoreReader(tmp_path / "unlabeled.h5")
    labels = pseudo.PseudoLabels(path, reader, model_inputs("linear", reader),
                                 NeuralOptions(batch_size=10, pseudo_threshold=0.5, pseudo_ratio=2.0))
    assert len(labels) == 38
    batches = labels.batches(seed=3, epoch=0, n_steps=30)
    assert len(batches) == 30 and all(len(b) == 20 for b in batches)
    drawn = np.concatenate(batches)
    assert drawn.max() < 38
    assert 0.4 < (drawn >= 30).mean() < 0.6                 # the 8 tail rows drawn as often as the 30 head rows
    assert all(np.array_equal(a, b) for a, b in zip(batches, labels.batches(seed=3, epoch=0, n_steps=30)))
    assert not np.array_equal(drawn, np.concatenate(labels.batches(seed=3, epoch=1, n_steps=30)))
    batch = labels.dataset[batches[0]]
    np.testing.assert_array_equal(batch["rows"].numpy(), batches[0])         # repeats kept, in draw order
    np.testing.assert_array_equal(batch["soft_target"].numpy(), proba[batches[0]].astype(np.float16))
    np.testing.assert_array_equal(batch["text_pooled"].numpy(),
                                  reader.read("text_pooled", batches[0]).astype(np.float32))


def _two_modality_batch(n=400):
    """Rows 0..n/2 have text and frames; the next quarter text only, the last frames only."""
    from core import schema
    g = torch.Generator().manual_seed(3)
    text_mask = torch.ones(n, 5, dtype=torch.bool)
    frame_mask = torch.ones(n, 4, dtype=torch.bool)
    frame_mask[n // 2: 3 * n // 4] = False
    text_mask[3 * n // 4:] = False
    return {schema.TEXT_TOKENS: torch.rand(n, 5, 3, generator=g) + 1, schema.TEXT_TOKEN_MASK: text_mask,
            schema.FRAME_EMB: torch.rand(n, 4, 2, generator=g) + 1, schema.FRAME_MASK: frame_mask,
            "agg/nextvlad": torch.rand(n, 6, generator=g) + 1, "rows": torch.arange(n)}


def test_modality_drop_takes_one_modality_from_the_share_of_rows_that_have_both():
    from core import schema
    from neural.train import drop_modality
    batch = _two_modality_batch()
    out = drop_modality(batch, 0.5, torch.Generator().manual_seed(0))
    text_gone = ~out[schema.TEXT_TOKEN_MASK].any(1) & batch[schema.TEXT_TOKEN_MASK].any(1)         # (B,)
    frames_gone = ~out[schema.FRAME_MASK].any(1) & batch[schema.FRAME_MASK].any(1)
    both = batch[schema.TEXT_TOKEN_MASK].any(1) & batch[schema.FRAME_MASK].any(1)
    assert not (text_gone & frames_gone).any()                     # never both: the row keeps one modality
    assert not ((text_gone | frames_gone) & ~both).any()           # a one-modality row is never emptied
    share = (text_gone | frames_gone)[both].float().mean()
    assert 0.4 < share < 0.6 and 0.3 < text_gone[both].float().mean() / share < 0.7, share
    # a dropped side is zeroed (aggregates go with the frames), the rest is untouched
    assert (out[schema.TEXT_TOKENS][text_gone] == 0).all() and (out[schema.FRAME_EMB][frames_gone] == 0).all()
    assert (out["agg/nextvlad"][frames_gone] == 0).all() and (out["agg/nextvlad"][~frames_gone] > 0).all()
    kept = ~(text_gone | frames_gone)
    for key in (schema.TEXT_TOKENS, schema.FRAME_EMB, schema.FRAME_MASK, schema.TEXT_TOKEN_MASK):
        assert torch.equal(out[key][kept], batch[key][kept])
    assert torch.equal(out["rows"], batch["rows"])
    again = drop_modality(batch, 0.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(out[k], again[k]) for k in out)          # seeded
    assert drop_modality(batch, 0.0, torch.Generator()) is batch
    one_modality = {k: v for k, v in batch.items() if k in (schema.TEXT_TOKENS, schema.TEXT_TOKEN_MASK, "rows")}
    assert drop_modality(one_modality, 1.0, torch.Generator()) is one_modality


def test_a_student_with_modality_drop_trains_records_it_and_differs(planted, tmp_path):
    cache, teacher, _ = planted
    _student(cache, teacher, tmp_path / "plain", models=("single",), epochs=2)
    _student(cache, teacher, tmp_path / "drop", models=("single",), epochs=2, pseudo_modality_drop=0.5)
    plain, _ = outputs.read_oof(tmp_path / "plain" / "single" / "predictions.h5")
    dropped, _ = outputs.read_oof(tmp_path / "drop" / "single" / "predictions.h5")
    assert np.isfinite(dropped).all() and not np.allclose(plain, dropped)
    assert json.loads((tmp_path / "drop" / "run.json").read_text())["options"]["pseudo_modality_drop"] == 0.5
