"""Nothing silently wrong, nothing lost (docs/safety.md): `predict` is a function of (model, videos),
`--overwrite` deletes only what the project wrote, and every input a command needs is checked before its
first expensive step, so a failure leaves nothing half-done and no empty directory behind.

One tiny pipeline (precomputed frame features, the embedded MiniLM on text) runs once through the CLI;
each test copies what it changes.
"""
import io
import json
import shutil
import zipfile

import h5py
import numpy as np
import pytest
import torch

from inference.model_dir import ModelDirError, open_model_dir, write_manifest
from neural.options import NeuralOptions
from neural.outputs import RunError
from neural.pipeline import train_neural
from demo.synthetic import generate_feature_zip_dataset
from tests.commands import EXTRACT, STACK, cli_pipeline, invoke
from tests.commands import cli_ok as run_ok
from tests.fakes import write_fake_store

torch.set_num_threads(1)
TINY = dict(n_folds=3, epochs=1, hidden=16, batch_size=16, n_heads=2)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """extract -> train-neural -> stack through the CLI on 36 labelled and 8 test videos (4 classes)."""
    paths = cli_pipeline(tmp_path_factory.mktemp("safety"), signal=3.0, tail_ratio=1.0)
    return {**paths, "model": paths["stack"] / "model"}


def labelled_videos(data):
    """[(annotation entry, frame features (n, D) float16)] of the generated labelled split."""
    entries = json.loads((data / "annotations" / "labeled.json").read_text())
    with zipfile.ZipFile(data / "zip_feats" / "labeled.zip") as zf:
        return [(e, np.load(io.BytesIO(zf.read(f"{e['id']}.npy")))) for e in entries]


def write_split(data, split, ids, videos):
    """DATA/annotations/<split>.json and zip_feats/<split>.zip: video i of `videos` under id ids[i]."""
    (data / "annotations").mkdir(parents=True, exist_ok=True)
    (data / "zip_feats").mkdir(parents=True, exist_ok=True)
    entries = [{**{k: v for k, v in e.items() if k != "category_id"}, "id": vid} for vid, (e, _) in zip(ids, videos)]
    (data / "annotations" / f"{split}.json").write_text(json.dumps(entries))
    with zipfile.ZipFile(data / "zip_feats" / f"{split}.zip", "w") as zf:
        for vid, (_, frames) in zip(ids, videos):
            buf = io.BytesIO()
            np.save(buf, frames)
            zf.writestr(f"{vid}.npy", buf.getvalue())


def labels_of(csv_path):
    return [line.split(",")[1] for line in csv_path.read_text().splitlines()]


def files_under(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- 1. predict is f(model, videos)

def test_predict_rerun_on_changed_videos_to_the_same_out_gives_the_labels_of_a_fresh_cache(pipeline, tmp_path):
    videos = labelled_videos(pipeline["data"])
    first = [v for v in videos if v[0]["category_id"] == videos[0][0]["category_id"]][:4]
    other = [v for v in videos if v[0]["category_id"] != videos[0][0]["category_id"]][:4]
    ids = [f"n{i:04d}" for i in range(4)]
    data, out = tmp_path / "data", tmp_path / "new.csv"
    write_split(data, "new", ids, first)
    run_ok("predict", "--data", data, "--split", "new", "--model", pipeline["model"], "--out", out)
    before = labels_of(out)

    write_split(data, "new", ids, other)                 # same ids, other titles and frames
    run_ok("predict", "--data", data, "--split", "new", "--model", pipeline["model"], "--out", out)
    fresh = tmp_path / "fresh.csv"
    run_ok("predict", "--data", data, "--split", "new", "--model", pipeline["model"], "--out", fresh,
           "--cache", tmp_path / "fresh_cache")
    assert labels_of(fresh) != before                    # the change is visible to a fresh cache
    assert labels_of(out) == labels_of(fresh)


def test_a_conflicting_store_in_a_cache_predict_did_not_make_is_kept_and_refused_with_advice_that_works(
        pipeline, tmp_path):
    cache = tmp_path / "mine"
    shutil.copytree(pipeline["cache"], cache)            # the training cache: its test.h5 holds other videos
    before = files_under(cache)
    data, out = tmp_path / "data", tmp_path / "p.csv"
    write_split(data, "test", [f"n{i:04d}" for i in range(3)], labelled_videos(pipeline["data"])[:3])
    result = invoke("predict", "--data", data, "--split", "test", "--model", pipeline["model"],
                    "--out", out, "--cache", cache)
    assert result.exit_code != 0
    assert "--overwrite" not in result.output and "--out" not in result.output
    assert f"{cache / 'test.h5'}" in result.output and "--cache" in result.output
    assert files_under(cache) == before and not out.exists()
    run_ok("predict", "--data", data, "--split", "test", "--model", pipeline["model"],
           "--out", out)                                 # the advice: its own cache (OUT.cache/) works


def test_a_store_of_another_precision_in_predicts_own_cache_is_rebuilt(pipeline, tmp_path):
    out = tmp_path / "p.csv"
    run_ok("predict", "--data", pipeline["data"], "--split", "test", "--model", pipeline["model"], "--out", out)
    expected = out.read_text()
    store = tmp_path / "p.csv.cache" / "test.h5"
    with h5py.File(store, "r+") as h5:
        config = json.loads(h5.attrs["config"])
        h5.attrs["config"] = json.dumps({**config, "precision": "bf16"}, sort_keys=True)
    run_ok("predict", "--data", pipeline["data"], "--split", "test", "--model", pipeline["model"], "--out", out)
    assert out.read_text() == expected
    with h5py.File(store, "r") as h5:
        assert json.loads(h5.attrs["config"])["precision"] == "fp32"


def test_extract_rerun_on_changed_videos_is_refused_naming_the_inputs_and_overwrite_rebuilds(tmp_path):
    data = tmp_path / "data"
    generate_feature_zip_dataset(data, 6, n_frames=2, dim=8, split="new", n_classes=2, progress=False)
    args = ["extract", "--data", data, "--out", tmp_path / "cache", "--no-aggregates", *EXTRACT]
    run_ok(*args)
    entries = json.loads((data / "annotations" / "new.json").read_text())
    entries[0]["title"] = "a title written since"
    (data / "annotations" / "new.json").write_text(json.dumps(entries))
    result = invoke(*args)
    assert result.exit_code != 0
    assert "annotations_sha256" in result.output and "--overwrite" in result.output
    run_ok(*args, "--overwrite")
    run_ok(*args)                                        # the rebuilt store matches the inputs now


# ----------------------------------------------------------------------------- 2. --overwrite deletes only ours

def small_cache(root):
    root.mkdir()
    write_fake_store(root / "labeled.h5", n=30)
    with h5py.File(root / "codebook.h5", "w") as h5:          # stands for the codebook
        h5["centres"] = np.zeros((2, 4), np.float32)
    return files_under(root)


def test_train_neural_with_out_equal_to_cache_is_refused_and_the_cache_is_intact(tmp_path):
    cache = tmp_path / "cache"
    before = small_cache(cache)
    with pytest.raises(RunError, match="--out is the cache directory"):
        train_neural(cache, cache, ["linear"], NeuralOptions(**TINY), overwrite=True)
    assert files_under(cache) == before
    with pytest.raises(RunError, match=r"did not write \(cache/codebook\.h5, cache/labeled\.h5\)"):
        train_neural(cache, tmp_path, ["linear"], NeuralOptions(**TINY), overwrite=True)    # --out holds the cache
    assert files_under(cache) == before
    train_neural(cache, cache / "run", ["linear"], NeuralOptions(**TINY), overwrite=True)   # a run inside: its own files
    assert set(before) < set(files_under(cache))


def test_train_neural_overwrite_refuses_a_run_dir_holding_a_foreign_file_naming_it(tmp_path):
    cache = tmp_path / "cache"
    small_cache(cache)
    run_dir = tmp_path / "run"
    train_neural(cache, run_dir, ["linear"], NeuralOptions(**TINY))
    (run_dir / "linear" / "notes.txt").write_text("mine")
    (run_dir / "thesis.tex").write_text("mine too")
    with pytest.raises(RunError, match=r"linear/notes\.txt.*thesis\.tex"):
        train_neural(cache, run_dir, ["linear"], NeuralOptions(**TINY), overwrite=True)
    assert (run_dir / "linear" / "notes.txt").read_text() == "mine"
    assert (run_dir / "thesis.tex").exists() and (run_dir / "run.json").exists()


def test_train_neural_overwrite_still_replaces_a_previous_run(tmp_path):
    cache = tmp_path / "cache"
    small_cache(cache)
    run_dir = tmp_path / "run"
    train_neural(cache, run_dir, ["linear", "single"], NeuralOptions(**TINY))
    train_neural(cache, run_dir, ["linear"], NeuralOptions(**{**TINY, "seed": 3}), overwrite=True)
    assert not (run_dir / "single").exists()               # the earlier run's files are gone
    assert json.loads((run_dir / "run.json").read_text())["seed"] == 3


def test_extract_overwrite_refuses_a_file_under_a_store_name_that_is_not_a_store(tmp_path):
    data = tmp_path / "data"
    generate_feature_zip_dataset(data, 4, n_frames=2, dim=8, split="folds", n_classes=2, progress=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with h5py.File(run_dir / "folds.h5", "w") as h5:      # a run directory's folds.h5, not a feature store
        h5["fold"] = np.zeros(3, np.int64)
    result = invoke("extract", "--data", data, "--out", run_dir, "--no-aggregates", "--overwrite", *EXTRACT)
    assert result.exit_code != 0 and f"{run_dir / 'folds.h5'}" in result.output
    with h5py.File(run_dir / "folds.h5", "r") as h5:
        assert list(h5) == ["fold"]


def test_stack_refuses_an_out_holding_what_it_did_not_write_and_keeps_it(pipeline, tmp_path):
    run_before = files_under(pipeline["run"])
    result = invoke("stack", "--run", pipeline["run"], "--out", pipeline["run"], *STACK)
    assert result.exit_code != 0 and "stack did not write (folds.h5, " in result.output
    assert files_under(pipeline["run"]) == run_before
    out = tmp_path / "stack"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    result = invoke("stack", "--run", pipeline["run"], "--out", out, *STACK)
    assert result.exit_code != 0
    assert "model: holds 1 file(s) packaging the model did not write (notes.txt)" in result.output
    assert files_under(out) == ["model/notes.txt"]


# ----------------------------------------------------------------------------- 3. inputs checked first

def test_stack_with_a_fold_checkpoint_missing_fails_before_fitting_and_leaves_no_out(pipeline, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(pipeline["run"], run_dir)
    (run_dir / "vlad" / "fold2.safetensors").unlink()
    out = tmp_path / "stack"
    result = invoke("stack", "--run", run_dir, "--out", out, *STACK)
    assert result.exit_code != 0 and "vlad/fold2.safetensors" in result.output
    assert not out.exists()                              # no submission without a model behind it


def model_copy_with(pipeline, tmp_path, change):
    """A copy of the model directory whose model.json went through `change` (manifest rewritten)."""
    model = tmp_path / "model"
    shutil.copytree(pipeline["model"], model)
    (model / "manifest.json").unlink()
    record = json.loads((model / "model.json").read_text())
    change(record)
    (model / "model.json").write_text(json.dumps(record))
    write_manifest(model)
    return model


def test_predict_with_a_text_encoder_checksum_it_cannot_match_is_refused_before_extracting(pipeline, tmp_path):
    def other_weights(record):
        record["store_identity"]["text_encoder_checksum"] = "0" * 64
    model = model_copy_with(pipeline, tmp_path, other_weights)
    out = tmp_path / "p.csv"
    result = invoke("predict", "--data", pipeline["data"], "--split", "test", "--model", model, "--out", out)
    assert result.exit_code != 0
    assert "text_encoder_checksum" in result.output and "fresh --cache" not in result.output
    assert "minilm" in result.output
    assert not out.exists() and not (tmp_path / "p.csv.cache").exists()     # nothing extracted, no empty dir


@pytest.mark.parametrize("field,value", [("version", 2), ("format", "something-else")])
def test_a_model_json_of_another_format_or_newer_version_is_refused_naming_file_and_field(
        pipeline, tmp_path, field, value):
    model = model_copy_with(pipeline, tmp_path, lambda record: record.update({field: value}))
    with pytest.raises(ModelDirError, match=rf"model\.json: field '{field}' is {value!r}"):
        open_model_dir(model)
