"""`predict` with the real embedded encoders (EfficientNet-Lite0 on frames, MiniLM on text), rebuilt from
the spec the model directory recorded, on tiny JPEG-zip data through the CLI; then new videos in another
layout (.mp4 files) get their frames encoded, not masked.
"""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from features.categories import load_category_map
from features.store import StoreReader
from run import cli
from tests.media import write_annotations, write_jpeg_zip, write_mp4

COLOURS = [(220, 30, 30), (30, 30, 220)]
WORDS = ["red apple fruit", "blue ocean water"]


def run_ok(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def write_zip_split(data, split, n, classes, labelled):
    videos = []
    for i in range(n):
        c = i % 2
        vid = f"{split[0]}{i:04d}"
        write_jpeg_zip(data, split, vid, [COLOURS[c], tuple(v // 2 for v in COLOURS[c])])
        videos.append({"id": vid, "title": WORDS[c], "asr": "", "ocr": [],
                       **({"category_id": classes[c]} if labelled else {})})
    write_annotations(data, split, videos)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    data, cache, run_dir, stack_dir = root / "data", root / "cache", root / "run", root / "stack"
    classes = load_category_map().fine_ids[:2]
    write_zip_split(data, "labeled", 12, classes, True)
    write_zip_split(data, "test", 4, classes, False)
    run_ok("extract", "--data", data, "--out", cache, "--frames", "2", "--max-tokens", "8", "--workers", "0",
           "--device", "cpu", "--pca-dim", "8", "--clusters", "2", "--gmm-components", "2",
           "--codebook-sample", "100")
    run_ok("train-neural", "--cache", cache, "--out", run_dir, "--models", "mlp,vlad", "--folds", "3",
           "--epochs", "1", "--hidden", "16", "--batch-size", "8", "--threads", "1", "--workers", "0")
    run_ok("stack", "--model", run_dir, "--out", stack_dir, "--param", "n_rounds=5", "--param", "top_k=2", "--compare", "",
           "--threads", "1")
    moved = root / "shipped" / "model"
    moved.parent.mkdir()
    shutil.move(str(stack_dir / "model"), str(moved))
    submission = (stack_dir / "submission.csv").read_text()
    for gone in (cache, run_dir, stack_dir):
        shutil.rmtree(gone)
    return {"root": root, "data": data, "model": moved, "submission": submission, "classes": classes}


def test_the_model_directory_records_the_real_encoders_and_their_weights(model):
    identity = json.loads((model["model"] / "model.json").read_text())["store_identity"]
    assert identity["frame_encoder"] == "efficientnet-lite0" and identity["text_encoder"] == "minilm"
    assert len(identity["frame_encoder_checksum"]) == 64 and len(identity["text_encoder_checksum"]) == 64


def test_predict_rebuilds_the_recorded_encoders_and_reproduces_the_submission(model, tmp_path):
    out = tmp_path / "test.csv"
    run_ok("predict", "--data", model["data"], "--split", "test", "--model", model["model"], "--out", out)
    assert out.read_text() == model["submission"]


def test_predict_runs_the_recorded_runtime_or_an_interchangeable_one_to_the_same_labels(model, tmp_path):
    """extract's default on the CPU is onnx; the model records it; --runtime torch makes features that mix."""
    record = json.loads((model["model"] / "model.json").read_text())
    assert record["runtime"] == record["store_identity"]["runtime"] == "onnx"
    out = tmp_path / "torch.csv"
    run_ok("predict", "--data", model["data"], "--split", "test", "--model", model["model"], "--out", out,
           "--runtime", "torch")
    assert out.read_text() == model["submission"]
    with StoreReader(tmp_path / "torch.csv.cache" / "test.h5") as reader:
        assert reader.config["runtime"] == "torch"


def test_a_model_trained_on_frame_zips_predicts_mp4_videos_with_their_frames(model, tmp_path):
    data = tmp_path / "data"
    videos = [{"id": f"n{i:04d}", "title": WORDS[i % 2], "asr": "", "ocr": []} for i in range(3)]
    write_annotations(data, "new", videos)
    for video in videos:
        write_mp4(data / "videos" / "new" / f"{video['id']}.mp4", n_frames=6)
    out = tmp_path / "new.csv"
    run_ok("predict", "--data", data, "--split", "new", "--model", model["model"], "--out", out,
           "--cache", tmp_path / "cache")
    with StoreReader(tmp_path / "cache" / "new.h5") as reader:
        assert reader.read("frame_mask", slice(None)).all()                  # (3, 2): every frame real
        assert np.abs(reader.read("frame_emb", slice(None)).astype(np.float32)).sum(axis=2).min() > 0
        assert reader.config["options"]["frames_from"] == "video"
    report = json.loads((tmp_path / "cache" / "new.report.json").read_text())
    assert report["n_videos_with_faults"] == 0
    assert [line.split(",")[0] for line in out.read_text().splitlines()] == [v["id"] for v in videos]
    assert {line.split(",")[1] for line in out.read_text().splitlines()} <= set(load_category_map().fine_ids)


# ------------------------------------------------------------------ the Python API on each kind of raw frames

def zip_records(data, split, tmp_path, decoded):
    """The split's videos as the API's records: frames as the zip's images written to files, or decoded arrays."""
    import zipfile
    from PIL import Image
    records = []
    for video in json.loads((data / "annotations" / f"{split}.json").read_text()):
        with zipfile.ZipFile(data / "zip_frames" / split / video["id"][-3:] / f"{video['id']}.zip") as zf:
            names = sorted(zf.namelist())
            for name in names:
                zf.extract(name, tmp_path / video["id"])
        files = [tmp_path / video["id"] / name for name in names]
        frames = [np.asarray(Image.open(f).convert("RGB")) for f in files] if decoded else [str(f) for f in files]
        records.append({**{k: video[k] for k in ("id", "title", "asr", "ocr")}, "frames": frames})
    return records


@pytest.fixture(scope="module")
def classifier(model):
    """One Classifier for the module's API tests; counts the encoders it builds."""
    import features.encoders as encoders
    from inference.api import load_model
    builds, patch = [], pytest.MonkeyPatch()
    for name in ("build_text_encoder", "build_frame_encoder"):
        real = getattr(encoders, name)
        patch.setattr(encoders, name, lambda *a, _real=real, _name=name, **k: builds.append(_name) or _real(*a, **k))
    yield load_model(model["model"], device="cpu", threads=1), builds
    patch.undo()


@pytest.mark.parametrize("decoded", [False, True], ids=["image files", "decoded arrays"])
def test_the_api_labels_image_files_and_decoded_arrays_as_predict_labels_the_zips(model, classifier, tmp_path,
                                                                                     decoded):
    clf, _ = classifier
    expected = [line.split(",")[1] for line in model["submission"].splitlines()]
    assert clf.predict(zip_records(model["data"], "test", tmp_path, decoded)) == expected


def test_the_api_labels_video_files_as_predict_does_and_builds_each_encoder_once(model, classifier, tmp_path):
    clf, builds = classifier
    data = tmp_path / "data"
    videos = [{"id": f"n{i:04d}", "title": WORDS[i % 2], "asr": "", "ocr": []} for i in range(3)]
    write_annotations(data, "new", videos)
    for i, video in enumerate(videos):
        write_mp4(data / "videos" / "new" / f"{video['id']}.mp4", n_frames=4 + i)
    out = tmp_path / "new.csv"
    before = len(builds)
    run_ok("predict", "--data", data, "--split", "new", "--model", model["model"], "--out", out, "--workers", "0")
    del builds[before:]                                   # the CLI's own encoders: not the Classifier's
    records = [{**v, "frames": data / "videos" / "new" / f"{v['id']}.mp4"} for v in videos]
    assert clf.predict(records) == [line.split(",")[1] for line in out.read_text().splitlines()]
    table = clf.predict_proba(records, top_k=2, as_frame=False)
    assert [(r["id"], r["rank"]) for r in table] == [(v["id"], k) for v in videos for k in (1, 2)]
    assert sorted(builds) == ["build_frame_encoder", "build_text_encoder"]     # one each, over all its calls


def test_the_api_refuses_frame_features_for_a_model_trained_on_raw_frames_in_one_line(classifier):
    from inference.videos import VideoRecordError
    clf, _ = classifier
    video = {"id": "f1", "title": "x", "asr": "", "ocr": "", "frames": np.zeros((2, 1280), np.float32)}
    with pytest.raises(VideoRecordError, match="video 'f1': field frames holds frame features, but the model was "
                                               "trained on raw frames"):
        clf.predict([video])
