"""`predict` from a model directory, end to end through the real CLI, on tiny precomputed-feature data.

extract -> train-neural -> stack (which packages STACK_DIR/model) runs once on a generated feature-zip
dataset (precomputed frame features, so no frame encoder; the embedded MiniLM encodes the text). Then
the cache and the run directory are deleted, the model directory is moved, and `predict --model`
must reproduce the submission from it alone; a model directory that was changed is refused.
"""
import json
import shutil

import pytest

from features.store import StoreReader
from inference.model_dir import ModelDirError, verify
from inference.package import PackageError, package_model
from inference.predict import PredictError, check_identity
from tests.commands import cli_pipeline, invoke
from tests.commands import cli_ok as run_ok
from tests.media import write_annotations, write_jpeg_zip

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """extract -> train-neural -> stack through the CLI; the cache and run directory still exist."""
    paths = cli_pipeline(tmp_path_factory.mktemp("e2e"), signal=1.0, tail_ratio=3.0)
    stacked = paths.pop("stacked")
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



# ------------------------------------------------------------------ the Python API and predict's extra outputs

def feature_records(data, split):
    """The split's videos as the API's records: annotations plus (F, D) features read from its feature zip."""
    import io
    import zipfile
    import numpy as np
    videos = json.loads((data / "annotations" / f"{split}.json").read_text())
    with zipfile.ZipFile(data / "zip_feats" / f"{split}.zip") as zf:
        arrays = {n.rsplit("/", 1)[-1][:-4]: np.load(io.BytesIO(zf.read(n))) for n in zf.namelist()
                  if n.endswith(".npy")}
    return [{**{k: v[k] for k in ("id", "title", "asr", "ocr")}, "frames": arrays[v["id"]]} for v in videos]


def stacker_own_proba(model_dir, store_path):
    """The packaged stacker's predict_proba on a predicted store, from its parts (not through predict)."""
    import numpy as np
    from neural.predict import predict_store
    from stacking.signals import build_input
    from stacking.stackers import load_stacker
    meta = json.loads((model_dir / "model.json").read_text())
    probas = predict_store(model_dir / "neural", store_path, meta["models"])
    with StoreReader(store_path) as reader:
        X = build_input(meta["models"], probas, reader, np.arange(len(reader.ids)), meta["signals"])
        return list(reader.ids), load_stacker(model_dir / "stack" / "stacker").predict_proba(X)


def test_the_api_labels_frame_features_as_predict_does_and_loads_the_text_encoder_once(trained, monkeypatch):
    import features.encoders as encoders
    from inference.api import load_model
    builds = []
    real = encoders.build_text_encoder
    monkeypatch.setattr(encoders, "build_text_encoder", lambda *a, **k: builds.append(a) or real(*a, **k))
    clf = load_model(trained["model"], device="cpu", threads=1)
    records = feature_records(trained["data"], "test")
    expected = [line.split(",")[1] for line in trained["submission"].splitlines()]
    assert clf.predict(records) == expected
    assert clf.predict(records) == expected and len(builds) == 1       # a second call reuses the encoder


def test_the_api_refuses_raw_frames_for_a_model_trained_on_features_in_one_line(trained):
    from inference.api import load_model
    from inference.videos import VideoRecordError
    import numpy as np
    video = {"id": "x1", "title": "t", "asr": "", "ocr": "", "frames": np.zeros((2, 8, 8, 3), np.uint8)}
    with pytest.raises(VideoRecordError, match=r"video 'x1': field frames holds decoded images, but the model was "
                                               r"trained on precomputed frame features"):
        load_model(trained["model"]).predict([video])


def test_predict_top_k_and_proba_are_the_stackers_own_probabilities(trained, tmp_path):
    import h5py
    import numpy as np
    from inference.api import load_model
    out = tmp_path / "labels.csv"
    result = run_ok("predict", "--data", trained["data"], "--split", "test", "--model", trained["model"].parent,
                    "--out", out, "--cache", tmp_path / "cache", "--top-k", "3", "--proba", tmp_path / "p.h5",
                    "--threads", "1", "--workers", "0", "--device", "cpu", "--batch-size", "4")
    assert "labels.topk.csv" in result.output and out.read_text() == trained["submission"]
    ids, own = stacker_own_proba(trained["model"], tmp_path / "cache" / "test.h5")             # (N, C)
    with h5py.File(tmp_path / "p.h5") as fh:
        assert [i.decode() for i in fh["ids"][:]] == ids
        np.testing.assert_allclose(fh["proba"][:], own, rtol=1e-5, atol=1e-6)
        classes = [c.decode() for c in fh["fine_classes"][:]]
        assert [f"{i},{classes[p]}" for i, p in zip(ids, fh["pred"][:])] == trained["submission"].splitlines()
    lines = (tmp_path / "labels.topk.csv").read_text().splitlines()
    assert lines[0] == "id,rank,category_id,level1_id,probability" and len(lines) == 1 + 3 * len(ids)
    rows = [line.split(",") for line in lines[1:]]
    for n, video in enumerate(ids):
        mine = rows[3 * n: 3 * n + 3]
        assert [r[0] for r in mine] == [video] * 3 and [r[1] for r in mine] == ["1", "2", "3"]
        assert [r[3] for r in mine] == [r[2][:2] for r in mine]           # the built-in map: level1 = 2 chars
        assert len({r[2] for r in mine}) == 3                              # the 3 best classes (ties: any order)
        np.testing.assert_allclose([float(r[4]) for r in mine], np.sort(own[n])[::-1][:3], rtol=1e-5)
        np.testing.assert_allclose([float(r[4]) for r in mine], [own[n, classes.index(r[2])] for r in mine],
                                   rtol=1e-5)
    # the API's table: the same numbers, best first (this tiny stacker's scores sum to less than one)
    table = load_model(trained["model"], device="cpu").predict_proba(feature_records(trained["data"], "test"),
                                                                     top_k=len(classes), as_frame=False)
    for n, video in enumerate(ids):
        probs = [r["probability"] for r in table if r["id"] == video]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-4
        np.testing.assert_allclose(sorted(probs, reverse=True), np.sort(own[n])[::-1], rtol=1e-5)


def test_predict_refuses_a_precision_other_than_the_models(trained, tmp_path):
    result = invoke("predict", "--data", trained["data"], "--split", "test", "--model", trained["model"],
                    "--out", tmp_path / "x.csv", "--precision", "bf16")
    assert result.exit_code != 0 and "--precision bf16: the model's features were made in fp32" in result.output
    assert not (tmp_path / "x.csv.cache").exists()
