"""`predict` from a model directory, end to end through the real CLI, on tiny precomputed-feature data.

extract -> train-neural -> stack (which packages STACK_DIR/model) runs once on a generated feature-zip
dataset (precomputed frame features, so no frame encoder; the embedded MiniLM encodes the text). Then
the cache and the run directory are deleted, the model directory is moved, and `predict --model`
must reproduce the submission from it alone; a model directory that was changed is refused.
"""
import json
import shutil

import pytest
from click.testing import CliRunner

from demo.synthetic import generate_feature_zip_dataset
from features.store import StoreReader
from inference.model_dir import ModelDirError, verify
from inference.package import PackageError, package_model
from inference.predict import PredictError, check_identity
from run import cli
from tests.media import write_annotations, write_jpeg_zip

EXTRACT = ["--frames", "4", "--max-tokens", "16", "--batch-size", "16", "--workers", "0", "--device", "cpu",
           "--pca-dim", "8", "--clusters", "4", "--gmm-components", "2", "--codebook-sample", "400"]
TRAIN = ["--models", "mlp,vlad", "--folds", "3", "--epochs", "1", "--hidden", "16", "--batch-size", "16",
         "--threads", "1", "--workers", "0"]
STACK = ["--param", "n_rounds=10", "--param", "top_k=3", "--compare", "", "--threads", "1"]


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exit_code != 0 and result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def run_ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """extract -> train-neural -> stack through the CLI; the cache and run directory still exist."""
    root = tmp_path_factory.mktemp("e2e")
    paths = {"root": root, "data": root / "data", "cache": root / "cache", "run": root / "run",
             "stack": root / "stack"}
    generate_feature_zip_dataset(paths["data"], 36, n_frames=4, dim=16, split="labeled", n_classes=4,
                                 signal=1.0, tail_ratio=3.0, progress=False)
    generate_feature_zip_dataset(paths["data"], 8, n_frames=4, dim=16, split="test", n_classes=4,
                                 with_labels=False, progress=False)
    run_ok("extract", "--data", paths["data"], "--out", paths["cache"], *EXTRACT)
    run_ok("train-neural", "--cache", paths["cache"], "--out", paths["run"], *TRAIN)
    stacked = run_ok("stack", "--model", paths["run"], "--out", paths["stack"], *STACK)
    assert f"model directory (all `predict --model` needs): {paths['stack'] / 'model'}" in stacked.output
    return paths


# these three run before `trained` deletes the cache and the run directory (tests run in file order)
def test_packaging_that_fails_midway_leaves_no_model_directory(pipeline, monkeypatch):
    import inference.package as package
    out = pipeline["root"] / "crashed"

    def crash(path):
        raise OSError("disk full")
    monkeypatch.setattr(package, "write_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        package_model(pipeline["run"], pipeline["stack"], out)
    assert not out.exists() and not out.with_name("crashed.tmp").exists()


def test_a_stack_fitted_on_another_run_is_not_packaged(pipeline, tmp_path):
    stack_dir = tmp_path / "stack"
    shutil.copytree(pipeline["stack"], stack_dir)
    meta = (stack_dir / "stack.json").read_text().replace('"fingerprint": "', '"fingerprint": "0')
    (stack_dir / "stack.json").write_text(meta)
    with pytest.raises(PackageError, match="fitted on another run"):
        package_model(pipeline["run"], stack_dir, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_a_run_missing_a_fold_file_is_not_packaged_and_only_checkpoints_travel(pipeline, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(pipeline["run"], run_dir)
    (run_dir / "mlp" / "fold0.pt").write_bytes(b"an old pickle checkpoint, never to be shipped")
    package_model(run_dir, pipeline["stack"], tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model" / "neural" / "mlp").iterdir()) == \
        sorted(f"fold{k}.{ext}" for k in range(3) for ext in ("json", "safetensors"))
    (run_dir / "mlp" / "fold1.json").unlink()
    with pytest.raises(PackageError, match=r"mlp/fold1\.json: fold model file missing"):
        package_model(run_dir, pipeline["stack"], tmp_path / "model2")
    assert not (tmp_path / "model2").exists()


@pytest.fixture(scope="module")
def trained(pipeline):
    """The model directory moved elsewhere, the cache, run and stack directories deleted."""
    submission = (pipeline["stack"] / "submission.csv").read_text()
    elsewhere = pipeline["root"] / "elsewhere" / "model"
    elsewhere.parent.mkdir()
    shutil.move(str(pipeline["stack"] / "model"), str(elsewhere))
    for gone in ("cache", "run", "stack"):
        shutil.rmtree(pipeline[gone])
    return {**pipeline, "model": elsewhere, "submission": submission}


def copy_model(trained, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(trained["model"], dst)
    return dst


def test_predict_from_a_moved_model_directory_reproduces_the_submission_without_cache_or_run(trained, tmp_path):
    out = tmp_path / "pred.csv"
    result = run_ok("predict", "--data", trained["data"], "--split", "test", "--model", trained["model"],
                    "--out", out, "--cache", tmp_path / "cache")
    assert "8 videos" in result.output
    assert out.read_text() == trained["submission"]


def test_predict_on_a_split_without_videos_is_refused_naming_its_file(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained["data"] / "zip_feats", data / "zip_feats")
    write_annotations(data, "test", [])
    result = invoke("predict", "--data", data, "--split", "test", "--model", trained["model"],
                    "--out", tmp_path / "pred.csv")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "test.json" in result.output and "split 'test' lists no videos" in result.output
    assert not (tmp_path / "pred.csv").exists()


def test_the_model_directory_holds_every_fold_model_the_stack_and_the_codebook_and_lists_each_file(trained):
    listed = verify(trained["model"])
    for name in ("model.json", "category_map.csv", "codebook.h5", "neural/run.json", "stack/stack.json",
                 "stack/reweight.json", "stack/stacker/stacker.json"):
        assert name in listed
    for model in ("mlp", "vlad"):
        assert {int(n.split("/")[-1][4]) for n in listed if n.startswith(f"neural/{model}/fold")} == {0, 1, 2}
    record = json.loads((trained["model"] / "model.json").read_text())
    assert record["store_identity"]["frame_encoder"] == "precomputed"
    assert record["aggregates"]["pca_dim"] == 8 and record["dims"]["frame_dim"] == 16


def test_a_missing_file_in_the_model_directory_is_refused_naming_it(trained, tmp_path):
    model = copy_model(trained, tmp_path)
    victim = next((model / "neural" / "vlad").glob("fold1.*"))
    victim.unlink()
    result = invoke("predict", "--data", trained["data"], "--split", "test", "--model", model,
                    "--out", tmp_path / "x.csv")
    assert result.exit_code != 0
    assert f"{victim}: listed in manifest.json but missing" in result.output
    assert not (tmp_path / "x.csv").exists()


def test_an_altered_file_in_the_model_directory_is_refused_naming_it(trained, tmp_path):
    model = copy_model(trained, tmp_path)
    reweight = model / "stack" / "reweight.json"
    reweight.write_text(reweight.read_text().replace('"kind_": "', '"kind_": "x'))
    with pytest.raises(ModelDirError, match=f"{reweight}: altered since it was packaged"):
        verify(model)


def test_an_unlisted_file_in_the_model_directory_is_refused_naming_it(trained, tmp_path):
    model = copy_model(trained, tmp_path)
    (model / "neural" / "mlp" / "fold9.pt").write_bytes(b"not ours")
    with pytest.raises(ModelDirError, match="fold9.pt: file not listed in manifest.json"):
        verify(model)


def test_raw_frames_for_a_model_trained_on_precomputed_features_are_refused(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained["data"] / "annotations", data / "annotations")
    for video in json.loads((data / "annotations" / "test.json").read_text()):
        write_jpeg_zip(data, "test", video["id"], [(200, 10, 10)])
    result = invoke("predict", "--data", data, "--split", "test", "--model", trained["model"],
                    "--out", tmp_path / "x.csv")
    assert result.exit_code != 0
    assert "has raw frames (zip), but the model was trained on precomputed frame features" in result.output


def test_a_store_of_another_text_encoder_or_precision_is_refused_naming_the_difference(trained, tmp_path):
    run_ok("predict", "--data", trained["data"], "--split", "test", "--model", trained["model"],
           "--out", tmp_path / "p.csv", "--cache", tmp_path / "cache")
    record = json.loads((trained["model"] / "model.json").read_text())
    with StoreReader(tmp_path / "cache" / "test.h5") as reader:
        check_identity(reader, record)                  # the store predict made passes
        other = json.loads(json.dumps(record))
        other["store_identity"]["text_encoder_checksum"] = "0" * 64
        with pytest.raises(PredictError, match="text_encoder_checksum: '0000"):
            check_identity(reader, other)
        other = json.loads(json.dumps(record))
        other["store_identity"]["precision"] = "bf16"
        with pytest.raises(PredictError, match="precision: 'bf16' -> "):
            check_identity(reader, other)

