"""`stack --stacker auto`: every registered stacker scored by its own OOF pass, the best fitted and saved.

On the small fake runs of tests/test_stack_fakes.py: the choice is the best recorded OOF score, every
candidate's score is recorded (and recomputable), the margin over the runner-up is right, the honest
score of choosing inside each outer fold is reported beside the optimistic one, and the saved stack
predicts exactly like one fitted with `--stacker <chosen>`, through inference's own loading too.
"""
import json
from dataclasses import fields
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from features.store import StoreReader, rows_of
from neural.metrics import metric_from_proba
from stacking import pipeline
from stacking.pipeline import StackOptions, best_of, stack
from stacking.rundir import RunDirError, load_run, split_predictions
from stacking.signals import build_input, signal_names_for
from stacking.stackers import STACKERS
from tests.test_stack_fakes import _softmax, write_fake_run, write_predictions

PARAMS = {"n_rounds": 60}
NESTED = "auto (chosen inside each outer fold; honest)"


@pytest.fixture(scope="module")
def auto(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    run_dir, _ = write_fake_run(root)
    metrics = stack(run_dir, root / "auto", StackOptions(stacker="auto", threads=1, params=PARAMS))
    return run_dir, root, metrics


def test_auto_records_every_candidate_and_fits_the_best(auto):
    run_dir, root, metrics = auto
    choice = metrics["auto"]
    scores = choice["candidates"]
    assert list(scores) == list(STACKERS)                          # the plain average among them
    # each score is that stacker's own OOF pass on the run's folds, recomputed here
    run = load_run(run_dir)
    with StoreReader(run.store_path) as reader:
        names = signal_names_for(reader, len(run.models), run.n_classes, True)
        X = build_input(run.models, run.oof, reader, rows_of(reader.ids, run.ids, reader.path), names)
    options = StackOptions(threads=1, params=PARAMS)
    for kind, score in scores.items():
        oof = pipeline.cross_val_predict(pipeline.stacker_maker(kind, options, run.fine_to_coarse), X, run.label, run.fold)
        assert score == pytest.approx(metric_from_proba(run.label, oof, run.fine_to_coarse)["mean"])
        assert metrics["table"][kind]["mean"] == score
    ranked = sorted(scores.values(), reverse=True)
    assert scores[choice["chosen"]] == ranked[0] == choice["chosen_oof_mean"]
    assert scores[choice["runner_up"]] == ranked[1] and choice["runner_up"] != choice["chosen"]
    assert choice["margin"] == pytest.approx(ranked[0] - ranked[1]) and choice["margin"] > 0
    # on this run the stackers that learn whom to trust per class beat the average by far
    assert choice["chosen"] != "average" and scores["average"] < ranked[0] - 0.1
    assert metrics["stacker"] == choice["chosen"]
    assert json.loads((root / "auto" / "stack.json").read_text())["stacker"] == choice["chosen"]
    assert json.loads((root / "auto" / "stacker" / "stacker.json").read_text())["kind"] == choice["chosen"]
    assert f"{choice['chosen']}+reweight" in metrics["table"]
    assert json.loads((root / "auto" / "metrics.json").read_text())["auto"] == choice


def test_auto_reports_the_honest_nested_choice_beside_the_optimistic_score(auto):
    run_dir, _, metrics = auto
    choice = metrics["auto"]
    assert "optimistic" in choice["optimistic"] and "same out-of-fold predictions" in choice["optimistic"]
    nested = choice["nested"]
    assert [p["fold"] for p in nested["per_fold"]] == list(range(load_run(run_dir).n_folds))
    for fold in nested["per_fold"]:                 # each outer fold's choice: the best on its inner pass
        assert list(fold["inner_scores"]) == list(STACKERS)
        assert fold["chosen"] == best_of(fold["inner_scores"])[0]
    assert nested["mean"] == metrics["table"][NESTED]["mean"]
    assert nested["reweighted_mean"] == metrics["table"]["auto+reweight (both inside each outer fold; honest)"]["mean"]
    assert nested["optimism"] == pytest.approx(choice["chosen_oof_mean"] - nested["mean"])
    # the honest score can only take rows from the candidates' own OOF predictions
    assert min(choice["candidates"].values()) <= nested["mean"] <= choice["chosen_oof_mean"] + 1e-12


def test_the_auto_stack_predicts_exactly_like_the_chosen_stacker(auto):
    run_dir, root, metrics = auto
    chosen = metrics["auto"]["chosen"]
    own = {f.name for f in fields(STACKERS[chosen].Params)}          # --param the chosen one accepts
    params = {k: v for k, v in PARAMS.items() if k.rpartition(".")[2] in own}
    plain = stack(run_dir, root / "plain", StackOptions(stacker=chosen, compare=(), threads=1, params=params))
    a, b = root / "auto", root / "plain"
    assert (a / "submission.csv").read_text() == (b / "submission.csv").read_text()
    assert json.loads((a / "stacker" / "stacker.json").read_text()) == json.loads((b / "stacker" / "stacker.json").read_text())
    assert json.loads((a / "reweight.json").read_text()) == json.loads((b / "reweight.json").read_text())
    assert sorted(p.name for p in (a / "stacker").iterdir()) == sorted(p.name for p in (b / "stacker").iterdir())
    for name in (chosen, f"{chosen}+reweight"):       # the nested reweighting too: the same inner passes
        assert metrics["table"][name] == plain["table"][name]
    assert metrics["reweight_per_fold"] == plain["reweight_per_fold"]
    # predict's own path (inference.predict.stack_probas) loads the chosen kind from stacker/stacker.json
    from inference.predict import stack_probas
    run = load_run(run_dir)
    ids, probas = split_predictions(run, "test")
    meta = json.loads((a / "stack.json").read_text())
    model = SimpleNamespace(model_json={"models": meta["models"], "signals": meta["signals"]}, stack_dir=a)
    with StoreReader(run_dir.parent / "cache" / "test.h5") as reader:
        pred = stack_probas(model, probas, reader, rows_of(reader.ids, ids, reader.path))
    lines = (a / "submission.csv").read_text().splitlines()
    assert [f"{i},{run.fine_classes[c]}" for i, c in zip(ids, pred)] == [ln.split(",")[0] + "," + ln.split(",")[1] for ln in lines]


def test_one_perfect_model_and_one_confidently_wrong_one_make_the_average_lose(tmp_path):
    """Model a is right on every video, b surer and always wrong: the average follows b, a stacker
    learns to trust a, so auto must not choose the average."""
    run_dir, _ = write_fake_run(tmp_path, n=120, n_test=12)
    for name, shift, logit in (("a", 0, 4.0), ("b", 1, 6.0)):
        path = run_dir / name / "predictions.h5"
        with h5py.File(path, "r") as h5:
            ids = [v.decode() for v in h5["ids"][:]]
            label = h5["label_fine"][:]
            test_ids, test = [v.decode() for v in h5["ids_test"][:]], h5["proba/test"][:]
        logits = np.zeros((len(label), test.shape[1]))
        logits[np.arange(len(label)), (label + shift) % test.shape[1]] = logit
        write_predictions(path, ids, label, _softmax(logits), {"test": (test_ids, test)})
    metrics = stack(run_dir, tmp_path / "out", StackOptions(stacker="auto", threads=1, params={"n_rounds": 20}))
    scores = metrics["auto"]["candidates"]
    assert scores["average"] < 0.5 and metrics["table"]["base:a"]["mean"] == 1.0
    assert metrics["auto"]["chosen"] == best_of(scores)[0] != "average"
    assert scores[metrics["auto"]["chosen"]] > 0.9, scores


def test_best_of_breaks_ties_by_registry_order():
    assert best_of({"rerank": 0.9, "lgbm": 0.95, "logreg": 0.95, "average": 0.1}) == ("lgbm", "logreg")
    assert best_of({"rerank": 1.0, "lgbm": 1.0, "logreg": 1.0, "average": 1.0}) == ("rerank", "lgbm")


def test_without_the_nested_choice_auto_says_its_score_was_not_checked(auto, tmp_path):
    run_dir, _, with_nested = auto
    metrics = stack(run_dir, tmp_path / "out", StackOptions(stacker="auto", nested_choice=False, threads=1,
                                                            params=PARAMS))
    choice = metrics["auto"]
    assert choice["nested"] is None and "no honest score" in choice["nested_not_measured"]
    assert NESTED not in metrics["table"] and "nested_reweight" in metrics["times_s"]
    # the same choice and the same nested reweighting of it as with the nested choice
    assert {k: choice[k] for k in ("candidates", "chosen", "runner_up", "margin")} == \
        {k: with_nested["auto"][k] for k in ("candidates", "chosen", "runner_up", "margin")}
    chosen = choice["chosen"]
    assert metrics["table"][f"{chosen}+reweight"] == with_nested["table"][f"{chosen}+reweight"]


def test_auto_refuses_what_the_other_stackers_refuse_and_nothing_more(tmp_path):
    run_dir, _ = write_fake_run(tmp_path, n=60, n_test=12, n_folds=2)
    with pytest.raises(RunDirError, match="has 2 folds.*at least 3"):
        stack(run_dir, tmp_path / "out", StackOptions(stacker="auto", threads=1, params={"n_rounds": 5}))
    # every stacker is in use under auto: a parameter of any of them is accepted
    pipeline.check_overrides({"C": 1.0, "rerank.top_k": 3, "lgbm.n_rounds": 5}, StackOptions(stacker="auto").kinds)


def test_cli_prints_the_choice_its_margin_and_its_optimism(tmp_path, monkeypatch):
    from click.testing import CliRunner
    import inference.package
    from run import cli
    run_dir, _ = write_fake_run(tmp_path, n=60, n_test=12)
    monkeypatch.setattr(inference.package, "package_model", lambda run_dir, stack_dir: f"{stack_dir}/model")
    base = ["stack", "--model", str(run_dir), "--param", "n_rounds=10", "--param", "rerank.top_k=3",
            "--param", "logreg.C=0.5", "--threads", "1", "--stacker", "auto"]
    for extra, tail in (([], "chosen inside each outer fold"), (["--no-nested-choice"], "not measured")):
        out = tmp_path / f"out{len(extra)}"
        result = CliRunner().invoke(cli, [*base, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        choice = json.loads((out / "metrics.json").read_text())["auto"]
        line = next(ln for ln in result.output.splitlines() if ln.startswith("auto: chose"))
        assert f"chose {choice['chosen']} (OOF mean-F1 {choice['chosen_oof_mean']:.4f})" in line
        assert f"{choice['margin']:+.4f} over {choice['runner_up']}" in line
        assert "optimistic" in line and tail in line
        assert all(f"{k} {v:.4f}" in line for k, v in choice["candidates"].items())
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "bad"), "--param", "zz=1"])
    assert result.exit_code != 0 and "no settable parameter 'zz'" in result.output
