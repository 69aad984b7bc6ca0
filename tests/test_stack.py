"""`stack` on a small fake run directory: scores, refusals, saved stack, submission and predict."""
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from features.store import StoreError
from neural.metrics import metric_from_proba
from stacking import pipeline
from stacking.labelshift import ShiftAdapter
from stacking.pipeline import StackOptions, decide, stack
from features.store import StoreReader, rows_of
from stacking.reweight import PriorReweighter
from stacking.rundir import RunDirError, load_run, split_predictions
from stacking.signals import build_input
from stacking.stackers import (STACKERS, StackerError, StackInput, check_overrides, load_stacker, make_stacker,
                               parse_overrides, stacker_params)
from stacking.submission import SubmissionError, read_predictions
from tests.fake_runs import write_fake_run, write_predictions


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    run_dir, test_label = write_fake_run(root)
    metrics = stack(run_dir, root / "out", StackOptions(stacker="rerank", threads=1, compare=("logreg", "lgbm"), params={"n_rounds": 60}))
    return run_dir, root / "out", metrics, test_label


def test_table_scores_every_method_on_the_run_folds(stacked):
    run_dir, out, metrics, _ = stacked
    run = load_run(run_dir)
    table = json.loads((out / "metrics.json").read_text())["table"]
    # base models and the average, recomputed here from the run's own OOF probabilities
    for m in run.models:
        assert table[f"base:{m}"] == pytest.approx(metric_from_proba(run.label, run.oof[m], run.fine_to_coarse))
    mean = np.mean([run.oof[m] for m in run.models], axis=0)
    assert table["average"] == pytest.approx(metric_from_proba(run.label, mean, run.fine_to_coarse))
    for name in ("logreg", "lgbm", "rerank", "rerank+reweight"):
        assert set(table[name]) == {"mean", "l2_micro", "l2_macro", "l1_micro", "l1_macro"}
    # the fake models make systematic, class-specific mistakes only a stacker can learn to discount
    best_base = max(table[f"base:{m}"]["mean"] for m in run.models)
    assert table["rerank"]["mean"] > table["average"]["mean"] > best_base
    assert table["logreg"]["mean"] > table["average"]["mean"]


def test_stacker_oof_pass_never_sees_the_scored_fold(stacked, monkeypatch):
    run_dir, _, _, _ = stacked
    run = load_run(run_dir)
    seen = []

    class Spy(STACKERS["average"]):
        def fit(self, X, y):
            seen.append(len(y))
            return super().fit(X, y)

    X = StackInput(np.stack([run.oof[m] for m in run.models]), np.zeros((len(run.ids), 1), np.float32))
    pipeline.oof_proba(Spy(), X, run.label, run.fold)
    assert seen == [int((run.fold != k).sum()) for k in range(run.n_folds)]
    seen.clear()
    fits = []
    monkeypatch.setattr(pipeline.PriorReweighter, "fit",
                        lambda self, proba, y, counts, f2c: (fits.append(len(y)), _identity(self, proba))[1])
    pipeline.nested_reweight(Spy(), X, run.label, run.fold, X.probas.mean(0), run.fine_to_coarse, "auto")
    # the reweighting of outer fold k is tuned only on the other folds' rows (an inner OOF pass there)
    assert fits == [int((run.fold != k).sum()) for k in range(run.n_folds)]
    assert len(seen) == run.n_folds * (run.n_folds - 1)


def _identity(rw, proba):
    rw.kind_, rw.param_, rw.score_ = "power", 0.0, 0.0
    rw.weights_ = np.ones(proba.shape[1])
    return rw


def test_submission_covers_the_test_split_and_is_right(stacked):
    run_dir, out, metrics, test_label = stacked
    run = load_run(run_dir)
    lines = (out / "submission.csv").read_text().splitlines()
    ids, probas = split_predictions(run, "test")
    assert [ln.split(",")[0] for ln in lines] == list(ids)           # no header, one line per video
    predicted = np.array([run.fine_classes.index(ln.split(",")[1]) for ln in lines])
    average = np.mean([probas[m] for m in run.models], axis=0).argmax(axis=1)
    assert (predicted == test_label).mean() > (average == test_label).mean()
    written = metrics["predictions"]["test"]
    assert (written["file"], written["rows"]) == ("submission.csv", len(ids))
    assert len(written["label_shift"]["estimated_priors"]) == run.n_classes and "decoding_changed" in written


def test_saved_stack_reproduces_the_submission(stacked):
    run_dir, out, _, _ = stacked
    run = load_run(run_dir)
    ids, probas = split_predictions(run, "test")
    meta = json.loads((out / "stack.json").read_text())
    # only what the stack directory holds: stack.json's models and signals, stacker/, reweight.json
    with StoreReader(run_dir.parent / "cache" / "test.h5") as reader:
        X = build_input(meta["models"], probas, reader, rows_of(reader.ids, ids, reader.path), meta["signals"])
    # ... and stack.json's label-shift adapter and options, decided on the split as a whole
    adapter = ShiftAdapter.from_dict(meta["label_shift_adapter"])
    options = StackOptions(**{k: meta["options"][k] for k in ("label_shift", "decode", "seed")})
    pred, _ = decide(load_stacker(out / "stacker").predict_proba(X), PriorReweighter.load(out / "reweight.json"),
                     adapter, np.asarray(meta["fine_to_coarse"]), options)
    expected = [ln.split(",")[1] for ln in (out / "submission.csv").read_text().splitlines()]
    assert [run.fine_classes[c] for c in pred] == expected


def test_plot_and_low_quartile_report(stacked):
    _, out, metrics, _ = stacked
    assert Image.open(out / "per_class_f1.png").size[0] > 300
    lq = metrics["low_quartile"]
    assert lq["change"] == pytest.approx(lq["macro_f1_after"] - lq["macro_f1_before"])
    assert 0 < lq["n_classes"] <= metrics["n_classes"]


@pytest.mark.parametrize("kind", sorted(STACKERS))
def test_each_stacker_saves_and_loads_to_the_same_predictions(kind, tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, size=150)
    y[y == 4] = 3                                   # class 4 never seen in training
    probas = rng.dirichlet(np.ones(5), size=(2, 150)).astype(np.float32)
    probas[0, np.arange(150), y] += 1.0
    X = StackInput(probas / probas.sum(axis=2, keepdims=True), rng.normal(size=(150, 3)).astype(np.float32))
    params = stacker_params(kind, {"threads": 1}, {"n_rounds": 20, "top_k": 3})
    fitted = make_stacker(kind, **params).fit(X, y)
    proba = fitted.predict_proba(X)
    assert proba.shape == (150, 5)
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    fitted.save(tmp_path / kind)
    assert np.allclose(load_stacker(tmp_path / kind).predict_proba(X), proba, atol=1e-6)
    if kind != "average":
        assert (proba.argmax(axis=1) == y).mean() > 0.8


def test_refuses_missing_models_and_other_stores_classes_or_folds(tmp_path):
    run_dir, _ = write_fake_run(tmp_path, n=60, n_test=12)
    with pytest.raises(RunDirError, match="missing: c"):
        load_run(run_dir, models=["a", "c"])
    config = json.loads((run_dir / "run.json").read_text())

    other = dict(config, fine_classes=list(reversed(config["fine_classes"])))
    (run_dir / "run.json").write_text(json.dumps(other))
    with pytest.raises(RunDirError, match="fine_classes differ"):
        load_run(run_dir)

    other = dict(config, store_config={"fake": False})
    (run_dir / "run.json").write_text(json.dumps(other))
    with pytest.raises(RunDirError, match="different store"):
        load_run(run_dir)
    (run_dir / "run.json").write_text(json.dumps(config))

    with h5py.File(run_dir / "folds.h5", "r+") as h5:          # folds drawn with another seed
        h5.attrs["seed"] = 7
    with pytest.raises(RunDirError, match="model 'a' was trained with seed=0.*another fold assignment"):
        load_run(run_dir)
    with h5py.File(run_dir / "folds.h5", "r+") as h5:          # another fold assignment's ids
        h5.attrs["seed"] = 0
        ids = h5["ids"][:]
        h5["ids"][:] = np.roll(ids, 1)
    with pytest.raises(RunDirError, match="model 'a' has other labelled ids"):
        load_run(run_dir)


def test_refuses_a_submission_split_the_run_lacks(tmp_path):
    run_dir, _ = write_fake_run(tmp_path, n=60, n_test=12)
    with pytest.raises(RunDirError, match="no predictions for split 'unlabeled'.*test"):
        stack(run_dir, tmp_path / "out", StackOptions(split="unlabeled", threads=1))


def test_submission_ids_are_checked_against_the_store(tmp_path):
    run_dir, _ = write_fake_run(tmp_path, n=60, n_test=12)
    path = run_dir / "a" / "predictions.h5"
    with h5py.File(path, "r") as h5:
        ids = [v.decode() for v in h5["ids"][:]]
        label, oof = h5["label_fine"][:], h5["oof_proba"][:]
        test_ids = [v.decode() for v in h5["ids_test"][:]]
        test = h5["proba/test"][:]
    def rewrite(split_ids, split_proba):
        for model in ("a", "b"):
            write_predictions(run_dir / model / "predictions.h5", ids, label, oof, {"test": (split_ids, split_proba)})

    rewrite(test_ids[:-1], test[:-1])          # a test video without a prediction
    with pytest.raises(SubmissionError, match="1 missing, 0 unknown; e.g. missing test00011"):
        stack(run_dir, tmp_path / "out", StackOptions(threads=1, params={"n_rounds": 5}, compare=()))
    rewrite(test_ids[:-1] + ["intruder"], test)   # a prediction for a video the test store lacks
    with pytest.raises(StoreError, match="intruder"):
        stack(run_dir, tmp_path / "out", StackOptions(threads=1, params={"n_rounds": 5}, compare=()))


def test_read_predictions_round_trip(stacked):
    _, out, _, _ = stacked
    rows = read_predictions(out / "submission.csv")
    assert len(rows) == len((out / "submission.csv").read_text().splitlines())


def test_cli_stack_and_its_one_line_errors(tmp_path, monkeypatch):
    from click.testing import CliRunner
    import inference.package
    from run import cli
    run_dir, _ = write_fake_run(tmp_path, n=60, n_test=12)
    # the fake run has predictions but no fold models to package; packaging is tested on a real run
    # (tests/test_stack_e2e.py), here only the stack's options and errors
    monkeypatch.setattr(inference.package, "package_model", lambda run_dir, stack_dir: f"{stack_dir}/model")
    monkeypatch.setattr(inference.package, "check_packable", lambda run_dir, models, out_dir: None)
    runner = CliRunner()
    result = runner.invoke(cli, ["stack", "--model", str(run_dir), "--out", str(tmp_path / "out"),
                                 "--param", "n_rounds=5", "--param", "rerank.top_k=3", "--compare", "",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "rerank+reweight" in result.output
    assert len((tmp_path / "out" / "submission.csv").read_text().splitlines()) == 12
    saved = json.loads((tmp_path / "out" / "stacker" / "stacker.json").read_text())["params"]
    assert (saved["n_rounds"], saved["top_k"], saved["threads"]) == (5, 3, 1)
    for args, message in ((["--models", "a,zz"], "base model(s) missing: zz"),
                          (["--param", "n_round=5"], "no settable parameter 'n_round'"),
                          (["--param", "top_k=three"], "top_k=three"),
                          (["--param", "C=1", "--compare", ""], "'C': not a parameter of rerank"),
                          (["--compare", "logreg,zz"], "unknown stacker(s) zz")):
        result = runner.invoke(cli, ["stack", "--model", str(run_dir), "--out", str(tmp_path / "out2"), *args])
        assert result.exit_code != 0
        assert message in result.output and "Traceback" not in result.output, result.output


def test_stack_and_compare_choices_come_from_the_registry():
    from run import cli
    options = {p.name: p for p in cli.commands["stack"].params}
    assert list(options["stacker"].type.choices) == [*STACKERS, "auto"]
    assert list(STACKERS) == ["rerank", "lgbm", "logreg", "average"]
    assert options["stacker"].default == "rerank"   # auto lost to it on unseen actors (bench/README, issue 13)
    for kind in STACKERS:
        assert kind in options["compare"].help and kind in options["stacker"].help


def test_stacker_parameters_are_defaults_then_shared_values_then_overrides():
    shared = {"threads": 2, "seed": 5, "fine_to_coarse": [0, 0, 1]}
    overrides = {"n_rounds": 7, "lgbm.n_rounds": 9, "logreg.C": 1.0}
    assert stacker_params("rerank", shared, overrides) == {**shared, "n_rounds": 7}
    assert stacker_params("lgbm", shared, overrides) == {"threads": 2, "seed": 5, "n_rounds": 9}
    assert stacker_params("logreg", shared, overrides) == {"seed": 5, "C": 1.0}
    assert stacker_params("average", shared, overrides) == {}
    made = make_stacker("lgbm", **stacker_params("lgbm", shared, overrides))
    assert (made.params.n_rounds, made.params.learning_rate) == (9, 0.1)          # the rest at defaults


def test_unknown_stackers_and_parameters_are_refused_naming_them():
    with pytest.raises(StackerError, match="unknown stacker 'zz'.*rerank"):
        check_overrides({}, ["rerank", "zz"])
    with pytest.raises(StackerError, match="'lgbm' is not used here"):
        check_overrides({"lgbm.n_rounds": 3}, ["rerank", "logreg"])
    with pytest.raises(StackerError, match="'C': not a parameter of rerank"):
        check_overrides({"C": 1.0}, ["rerank"])
    with pytest.raises(StackerError, match="seed comes from the stack itself"):
        check_overrides({"seed": 3}, ["rerank"])
    with pytest.raises(StackerError, match="stacker 'logreg' has no parameter top_k"):
        make_stacker("logreg", top_k=3)
    assert parse_overrides(["top_k=3", "logreg.C=0.5"]) == {"top_k": 3, "logreg.C": 0.5}
    with pytest.raises(StackerError, match="expected \\[kind.\\]name=value"):
        parse_overrides(["top_k"])
    with pytest.raises(StackerError, match="fine_to_coarse"):
        parse_overrides(["fine_to_coarse=1"])
    with pytest.raises(StackerError, match="unknown stacker 'zz'"):
        stack("unused", "unused", StackOptions(compare=("zz",)))


def test_a_saved_stacker_missing_a_file_is_refused_naming_it(tmp_path):
    X = StackInput(np.full((2, 30, 3), 1 / 3, np.float32), np.zeros((30, 1), np.float32))
    y = np.arange(30) % 3
    make_stacker("lgbm", n_rounds=2).fit(X, y).save(tmp_path / "lgbm")
    (tmp_path / "lgbm" / "booster.txt").unlink()
    with pytest.raises(StackerError, match="booster.txt: missing"):
        load_stacker(tmp_path / "lgbm")
    with pytest.raises(StackerError, match="stacker.json: cannot read"):
        load_stacker(tmp_path / "nothing")


def test_a_stacker_whose_arrays_fail_to_save_leaves_no_stacker_json(tmp_path, monkeypatch):
    X = StackInput(np.full((2, 30, 3), 1 / 3, np.float32), np.zeros((30, 1), np.float32))
    fitted = make_stacker("logreg").fit(X, np.arange(30) % 3)
    monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        fitted.save(tmp_path / "logreg")
    assert sorted(p.name for p in (tmp_path / "logreg").iterdir()) == []


def test_refuses_nested_reweighting_with_two_folds(tmp_path):
    run_dir, _ = write_fake_run(tmp_path, n=60, n_test=12, n_folds=2)
    with pytest.raises(RunDirError, match="has 2 folds.*at least 3"):
        stack(run_dir, tmp_path / "out", StackOptions(threads=1, params={"n_rounds": 5}, compare=()))


def test_stacking_imports_nothing_from_the_stages_after_it():
    """Data flows one way (notes/CONTRACTS.md): stacking/ may not reach inference/ or demo/."""
    import ast
    from pathlib import Path
    later = {"inference", "demo", "run"}
    offenders = []
    for path in sorted((Path(__file__).parents[1] / "stacking").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in later]
    assert offenders == []
