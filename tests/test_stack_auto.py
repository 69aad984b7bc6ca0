"""`stack --stacker auto`: rerank, the average and the --compare stackers scored by their own OOF passes;
rerank kept unless another beats it with the paired bootstrap band of its gain above zero.

On the small fake runs of tests/fake_runs.py: the choice follows that rule on the recorded
scores and bands, every candidate's score and gain is recomputable, the honest score of choosing inside
each outer fold is reported beside the optimistic one, and the saved stack predicts exactly like one
fitted with `--stacker <chosen>`, through inference's own loading too. On planted OOF predictions: a
candidate ahead by a few videos (noise) does not displace rerank, one ahead by many does.
"""
import json
from dataclasses import fields
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from features.store import StoreReader, rows_of
from neural.metrics import PairedBootstrap, band, metric_from_proba
from stacking import pipeline
from stacking.pipeline import AUTO_RESAMPLES, INCUMBENT, StackOptions, auto_choice, stack
from stacking.rundir import RunDirError, load_run, split_predictions
from stacking.signals import build_input, signal_names_for
from stacking.stackers import STACKERS
from tests.fake_runs import softmax, write_fake_run, write_predictions

PARAMS = {"n_rounds": 60}
NESTED = "auto (chosen inside each outer fold; honest)"


@pytest.fixture(scope="module")
def auto(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    run_dir, _ = write_fake_run(root)
    metrics = stack(run_dir, root / "auto", StackOptions(stacker="auto", threads=1, params=PARAMS))
    return run_dir, root, metrics


def rule(scores, gains):
    """The choice AUTO_RULE makes from recorded scores and gains."""
    beating = [k for k, g in gains.items() if g["band"][0] > 0]
    return max(beating, key=scores.get) if beating else INCUMBENT


def test_auto_records_every_candidate_and_fits_by_the_rule(auto):
    run_dir, root, metrics = auto
    choice = metrics["auto"]
    scores, gains = choice["candidates"], choice["gains"]
    assert list(scores) == [INCUMBENT, "average", "logreg"]       # rerank, the average, --compare's default
    assert choice["incumbent"] == INCUMBENT and list(gains) == ["average", "logreg"]
    # each score is that stacker's own OOF pass on the run's folds, recomputed here, and each gain's band
    # the paired bootstrap of the labelled videos against rerank's predictions
    run = load_run(run_dir)
    with StoreReader(run.store_path) as reader:
        names = signal_names_for(reader, len(run.models), run.n_classes, True)
        X = build_input(run.models, run.oof, reader, rows_of(reader.ids, run.ids, reader.path), names)
    options = StackOptions(threads=1, params=PARAMS)
    oofs = {kind: pipeline.oof_proba(pipeline.stacker_for(kind, options, run.fine_to_coarse), X, run.label, run.fold)
            for kind in scores}
    boot = PairedBootstrap(run.label, run.fine_to_coarse, AUTO_RESAMPLES, seed=0)
    for kind, oof in oofs.items():
        assert scores[kind] == pytest.approx(metric_from_proba(run.label, oof, run.fine_to_coarse)["mean"])
        assert metrics["table"][kind]["mean"] == scores[kind]
        if kind != INCUMBENT:
            assert gains[kind]["gain"] == pytest.approx(scores[kind] - scores[INCUMBENT])
            samples = boot.means(oof.argmax(1)) - boot.means(oofs[INCUMBENT].argmax(1))
            assert gains[kind]["band"] == pytest.approx(band(samples))
    # on this run the stackers that learn whom to trust per class beat the average beyond any noise
    assert gains["average"]["band"][1] < 0 and scores["average"] < scores[INCUMBENT] - 0.05
    assert choice["chosen"] == rule(scores, gains) == metrics["stacker"] != "average"
    assert choice["chosen_oof_mean"] == scores[choice["chosen"]]
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
        assert list(fold["inner_scores"]) == [INCUMBENT, "average", "logreg"]
        assert fold["chosen"] == rule(fold["inner_scores"], fold["inner_gains"])
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
    model = SimpleNamespace(model_json={"models": meta["models"], "signals": meta["signals"],
                                        "fine_to_coarse": list(run.fine_to_coarse)}, stack_json=meta, stack_dir=a)
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
        write_predictions(path, ids, label, softmax(logits), {"test": (test_ids, test)})
    metrics = stack(run_dir, tmp_path / "out", StackOptions(stacker="auto", threads=1, params={"n_rounds": 20}))
    scores = metrics["auto"]["candidates"]
    assert scores["average"] < 0.5 and metrics["table"]["base:a"]["mean"] == 1.0
    assert metrics["auto"]["chosen"] == rule(scores, metrics["auto"]["gains"]) != "average"
    assert scores[metrics["auto"]["chosen"]] > 0.9, scores


def planted(n=2000, n_classes=20, seed=0):
    """Labels y (N,), the fine-to-coarse map and OOF probabilities making exactly `wrong` mistakes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)

    def oof(wrong_rows):
        pred = y.copy()
        pred[wrong_rows] = (y[wrong_rows] + 1) % n_classes
        return np.eye(n_classes, dtype=np.float32)[pred]
    return y, np.arange(n_classes) % 4, oof


def test_a_candidate_ahead_by_noise_does_not_displace_the_incumbent():
    y, f2c, oof = planted()
    rows = np.random.default_rng(1).permutation(len(y))
    oofs = {INCUMBENT: oof(rows[:300]), "logreg": oof(rows[3:300]), "average": oof(rows[:400])}
    chosen, scores, gains = auto_choice(y, oofs, f2c, seed=0)
    assert scores["logreg"] > scores[INCUMBENT] > scores["average"]       # ahead by 3 videos of 2,000
    assert gains["logreg"]["band"][0] <= 0 < gains["logreg"]["band"][1]
    assert chosen == INCUMBENT


def test_candidates_ahead_beyond_the_noise_win_and_the_best_of_them_is_chosen():
    y, f2c, oof = planted()
    rows = np.random.default_rng(1).permutation(len(y))
    oofs = {INCUMBENT: oof(rows[:300]), "lgbm": oof(rows[:150]), "logreg": oof(rows[:100]),
            "average": oof(rows[:299])}
    chosen, scores, gains = auto_choice(y, oofs, f2c, seed=0)
    assert gains["lgbm"]["band"][0] > 0 and gains["logreg"]["band"][0] > 0 and gains["average"]["band"][0] <= 0
    assert chosen == "logreg" and scores["logreg"] > scores["lgbm"]


def test_auto_candidates_are_rerank_the_average_and_compare():
    assert StackOptions(stacker="auto").kinds == [INCUMBENT, "average", "logreg"]
    assert StackOptions(stacker="auto", compare=("lgbm", "average")).kinds == [INCUMBENT, "average", "lgbm"]
    assert StackOptions(stacker="auto", compare=()).kinds == [INCUMBENT, "average"]


def test_without_the_nested_choice_auto_says_its_score_was_not_checked(auto, tmp_path):
    run_dir, _, with_nested = auto
    metrics = stack(run_dir, tmp_path / "out", StackOptions(stacker="auto", nested_choice=False, threads=1,
                                                            params=PARAMS))
    choice = metrics["auto"]
    assert choice["nested"] is None and "no honest score" in choice["nested_not_measured"]
    assert NESTED not in metrics["table"] and "nested_reweight" in metrics["times_s"]
    # the same choice and the same nested reweighting of it as with the nested choice
    assert {k: choice[k] for k in ("candidates", "chosen", "gains")} == \
        {k: with_nested["auto"][k] for k in ("candidates", "chosen", "gains")}
    chosen = choice["chosen"]
    assert metrics["table"][f"{chosen}+reweight"] == with_nested["table"][f"{chosen}+reweight"]


def test_auto_refuses_what_the_other_stackers_refuse_and_nothing_more(tmp_path):
    run_dir, _ = write_fake_run(tmp_path, n=60, n_test=12, n_folds=2)
    with pytest.raises(RunDirError, match="has 2 folds.*at least 3"):
        stack(run_dir, tmp_path / "out", StackOptions(stacker="auto", threads=1, params={"n_rounds": 5}))
    # auto's candidates are in use: a parameter of any of them is accepted, of another refused
    pipeline.check_overrides({"C": 1.0, "rerank.top_k": 3}, StackOptions(stacker="auto").kinds)
    pipeline.check_overrides({"lgbm.n_rounds": 5}, StackOptions(stacker="auto", compare=("lgbm",)).kinds)
    with pytest.raises(Exception, match="'lgbm' is not used here"):
        pipeline.check_overrides({"lgbm.n_rounds": 5}, StackOptions(stacker="auto").kinds)


def test_cli_prints_the_choice_its_gains_and_its_optimism(tmp_path, monkeypatch):
    from click.testing import CliRunner
    import inference.package
    from run import cli
    run_dir, _ = write_fake_run(tmp_path, n=60, n_test=12)
    monkeypatch.setattr(inference.package, "package_model", lambda run_dir, stack_dir: f"{stack_dir}/model")
    monkeypatch.setattr(inference.package, "check_packable", lambda run_dir, models, out_dir: None)  # a fake run
    base = ["stack", "--run", str(run_dir), "--param", "n_rounds=10", "--param", "rerank.top_k=3",
            "--param", "logreg.C=0.5", "--threads", "1", "--stacker", "auto"]
    for extra, tail in (([], "chosen inside each outer fold"), (["--no-nested-choice"], "not measured")):
        out = tmp_path / f"out{len(extra)}"
        result = CliRunner().invoke(cli, [*base, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        choice = json.loads((out / "metrics.json").read_text())["auto"]
        line = next(ln for ln in result.output.splitlines() if ln.startswith("auto: chose"))
        assert f"chose {choice['chosen']} (OOF mean-F1 {choice['chosen_oof_mean']:.4f};" in line
        assert all(f"{k} {g['gain']:+.4f} [{g['band'][0]:+.4f}, {g['band'][1]:+.4f}]" in line
                   for k, g in choice["gains"].items()) and "rule: rerank is kept unless" in line
        assert "optimistic" in line and tail in line
        assert all(f"{k} {v:.4f}" in line for k, v in choice["candidates"].items())
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "bad"), "--param", "zz=1"])
    assert result.exit_code != 0 and "no settable parameter 'zz'" in result.output
