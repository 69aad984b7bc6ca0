"""extract end to end on tiny challenge-layout data with the embedded default encoders."""
import json
import os
import pickle
import signal
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from core import schema
from features.aggregates import AggregateOptions
from features.encoders import FrameEncoder
from features.extract import ExtractError, extract
from features.store import METADATA_CACHE_BYTES, StoreReader
from run import cli
from tests.commands import cli_ok, run_py, start
from tests.media import (CATS, MAP_CSV, extract_options as options, make_jpeg_dataset as make_dataset,
                         write_annotations, write_feature_zip, write_mp4)

@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data"))
    cache = tmp_path_factory.mktemp("cache")
    small_codebook = AggregateOptions(pca_dim=4, n_clusters=3, n_gmm=2, nextvlad_groups=2)
    reports = extract(root, ["labeled"], cache, options(category_map=str(root / "category_map.csv"),
                                                        aggregates=small_codebook))
    return root, cache, reports["labeled"]


def test_store_holds_labels_masks_and_config(extracted):
    root, cache, report = extracted
    store = StoreReader(cache / "labeled.h5")
    assert list(store.ids) == [f"v{i:03d}" for i in range(12)]
    assert store.read(schema.LABEL_FINE, slice(None)).tolist() == [i % 3 for i in range(12)]
    assert store.read(schema.LABEL_COARSE, slice(None)).tolist() == [0 if i % 3 < 2 else 1 for i in range(12)]
    frame_mask = store.read(schema.FRAME_MASK, slice(None))               # (N, F)
    expected = [min(1 + i % 4, 4) for i in range(12)]
    expected[5] = expected[7] = 0                                          # missing zip, zero frames
    assert frame_mask.sum(1).tolist() == expected
    frame_emb = store.read(schema.FRAME_EMB, slice(None)).astype(np.float32)
    assert frame_emb.shape == (12, 4, 1280)
    assert np.all(frame_emb[~frame_mask] == 0) and np.abs(frame_emb[frame_mask]).sum(-1).min() > 0
    field_mask = store.read(schema.TEXT_FIELD_MASK, slice(None))
    assert field_mask[:, 0].all() and field_mask[:, 1].all() and field_mask[:, 2].tolist() == [i % 2 == 1 for i in range(12)]
    assert store.read(schema.TEXT_LEN, slice(0, 1)).tolist() == [[7, len("early later"), 0]]
    config = store.config
    assert config["frame_encoder"] == "efficientnet-lite0" and len(config["frame_encoder_checksum"]) == 64
    assert config["options"]["frames"] == 4 and store.attrs["schema_version"] == schema.SCHEMA_VERSION
    assert "torch" in json.loads(store.attrs["environment"])


def test_aggregates_follow_the_embeddings(extracted):
    _, cache, report = extracted
    assert (cache / "codebook.h5").exists() and report["aggregates"]["rows"] == 12
    store = StoreReader(cache / "labeled.h5")
    assert store.attrs["aggregates_complete"]
    first = store.read("agg/first_frame", slice(None))                     # (N, D)
    np.testing.assert_array_equal(first, store.read(schema.FRAME_EMB, slice(None))[:, 0])
    netvlad = store.read("agg/netvlad", slice(None)).astype(np.float32)    # (N, K * d)
    assert netvlad.shape == (12, 3 * 4) and np.isfinite(netvlad).all()
    assert np.all(netvlad[[5, 7]] == 0)                                    # no frames: zeros, not NaN


def test_every_store_handle_reads_with_a_bounded_metadata_cache(extracted):
    _, cache, _ = extracted
    store = StoreReader(cache / "labeled.h5")
    worker = pickle.loads(pickle.dumps(store))                    # as a DataLoader worker gets it
    for reader in (store, worker):
        config = reader.h5.id.get_mdc_config()
        assert config.max_size == METADATA_CACHE_BYTES
        assert config.initial_size == METADATA_CACHE_BYTES
    assert worker.h5 is not store.h5
    store.close()
    worker.close()


def test_media_faults_are_counted_and_listed(extracted):
    root, cache, report = extracted
    on_disk = json.loads((cache / "labeled.report.json").read_text())
    assert on_disk == {k: v for k, v in report.items() if k != "aggregates"}
    by_id = {f["id"]: f for f in report["faults"]}
    assert set(by_id) == {"v005", "v006", "v007"}
    assert by_id["v005"]["reason"] == "missing zip" and by_id["v005"]["file"].endswith("v005.zip")
    assert "corrupt JPEG 9.jpg" in by_id["v006"]["reason"]
    assert by_id["v007"]["reason"] == "zero frames"
    assert report["n_videos_with_faults"] == 3
    # counted under short fixed kinds, never a key cut from a reason ("corrupt JPEG 9.jpg")
    assert report["fault_counts"] == {"missing zip": 1, "corrupt JPEG": 1, "zero frames": 1}
    assert by_id["v006"]["kind"] == "corrupt JPEG"


def test_tokens_are_masked_hidden_states(extracted):
    _, cache, _ = extracted
    store = StoreReader(cache / "labeled.h5")
    tokens = store.read(schema.TEXT_TOKENS, slice(None)).astype(np.float32)   # (N, T, Dt)
    token_mask = store.read(schema.TEXT_TOKEN_MASK, slice(None))
    assert tokens.shape == (12, 16, 384)
    assert np.all(tokens[~token_mask] == 0) and np.all(np.abs(tokens[token_mask]).sum(-1) > 0)
    # [CLS] title i [SEP] early later [SEP] (spoken words) [SEP]: every field joined, in order
    assert token_mask.sum(1).tolist() == [10 if i % 2 else 8 for i in range(12)]


def test_rerun_with_same_options_skips_and_other_options_refuse(extracted, tmp_path):
    root, cache, _ = extracted
    before = h5py.File(cache / "labeled.h5", "r")["frame_emb"][:]
    runner = CliRunner()
    args = ["extract", "--data", str(root), "--split", "labeled", "--out", str(cache), "--frames", "4",
            "--max-tokens", "16", "--batch-size", "4", "--workers", "0", "--device", "cpu",
            "--category-map", str(root / "category_map.csv"), "--no-aggregates"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert np.array_equal(before, h5py.File(cache / "labeled.h5", "r")["frame_emb"][:])
    changed = [a if a != "16" else "32" for a in args]                      # --max-tokens 32
    result = runner.invoke(cli, changed)
    assert result.exit_code == 1 and "options.max_tokens: 16 -> 32" in result.output and "--overwrite" in result.output


def test_overwrite_rebuilds_with_new_options(tmp_path):
    root = make_dataset(tmp_path / "data", n=4, faults=False)
    cmap = str(root / "category_map.csv")
    extract(root, ["labeled"], tmp_path / "c", options(category_map=cmap, frames=2))
    extract(root, ["labeled"], tmp_path / "c", options(category_map=cmap, frames=3, overwrite=True))
    assert StoreReader(tmp_path / "c" / "labeled.h5").read(schema.FRAME_EMB, slice(None)).shape[1] == 3


def test_on_error_fail_names_file_and_id(tmp_path):
    root = make_dataset(tmp_path / "data")
    result = CliRunner().invoke(cli, ["extract", "--data", str(root), "--out", str(tmp_path / "c"),
                                      "--category-map", str(root / "category_map.csv"), "--workers", "0",
                                      "--on-error", "fail", "--frames", "2", "--device", "cpu", "--no-aggregates"])
    assert result.exit_code == 1
    assert "v005.zip" in result.output and "video v005" in result.output and "missing zip" in result.output
    assert not StoreReader(tmp_path / "c" / "labeled.h5", require_complete=False).attrs["complete"]


def test_structural_fault_stops_the_command_with_one_line(tmp_path):
    root = make_dataset(tmp_path / "data", n=3, faults=False)
    videos = json.loads((root / "annotations" / "labeled.json").read_text())
    videos[1]["category_id"] = "0999"
    write_annotations(root, "labeled", videos)
    result = CliRunner().invoke(cli, ["extract", "--data", str(root), "--out", str(tmp_path / "c"),
                                      "--category-map", str(root / "category_map.csv")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "labeled.json" in result.output and "'v001'" in result.output and "'category_id'" in result.output


def test_feature_zip_layout_needs_no_frame_encoder_and_reports_each_bad_npy(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"f{i:03d}": rng.normal(size=(3 + i, 8)).astype(np.float16) for i in range(8)}
    arrays["f002"] = arrays["f002"].astype(np.float32)                      # castable: kept as float16
    arrays["f003"][1, 2] = np.inf                                           # NaN/inf
    arrays["f004"] = arrays["f004"].astype(np.float64) * 1e5                # overflows float16
    arrays["f005"] = arrays["f005"][:, :5]                                  # wrong shape
    arrays["f006"] = arrays["f006"][:0]                                     # zero frames
    arrays["f007"] = arrays["f007"].astype(np.int32)                        # wrong dtype
    write_feature_zip(tmp_path, "test", arrays)
    ids = list(arrays) + ["f008"]                                           # not in the zip
    write_annotations(tmp_path, "test", [{"id": k, "title": "x", "asr": "", "ocr": []} for k in ids])
    report = extract(tmp_path, ["test"], tmp_path / "c", options(frames=4))["test"]
    store = StoreReader(tmp_path / "c" / "test.h5")
    assert store.config["frame_encoder"] == "precomputed"
    assert store.read(schema.LABEL_FINE, slice(None)).tolist() == [-1] * 9
    mask = store.read(schema.FRAME_MASK, slice(None))
    assert mask.sum(1).tolist() == [3, 4, 4, 0, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(store.read(schema.FRAME_EMB, slice(0, 1))[0, :3], arrays["f000"])
    cast = store.read(schema.FRAME_EMB, slice(2, 3))[0]                     # (F, D) of the float32 video
    np.testing.assert_array_equal(cast, arrays["f002"][[0, 1, 3, 4]].astype(np.float16))
    reasons = {f["id"]: f["reason"] for f in report["faults"]}
    assert set(reasons) == {"f003", "f004", "f005", "f006", "f007", "f008"}
    assert reasons["f003"] == "NaN or inf values" and reasons["f006"] == "zero frames"
    assert reasons["f004"].startswith("float16 overflow") and "float64" in reasons["f004"]
    assert reasons["f005"].startswith("shape (8, 5)") and reasons["f007"].startswith("dtype int32")
    assert reasons["f008"] == "missing npy member"
    assert all(f["file"].endswith(f"test.zip:{f['id']}.npy") for f in report["faults"])
    on_disk = json.loads((tmp_path / "c" / "test.report.json").read_text())
    assert on_disk["n_videos_with_faults"] == 6 and sum(on_disk["fault_counts"].values()) == 6
    assert on_disk["fault_counts"] == {"NaN or inf values": 1, "float16 overflow": 1, "wrong shape": 1,
                                       "zero frames": 1, "wrong dtype": 1, "missing npy member": 1}


def test_text_the_tokenizer_cannot_read_is_measured_per_field_and_warned_about(tmp_path, capsys):
    """all-MiniLM-L6-v2's vocabulary lacks most Chinese characters: they become [UNK]."""
    titles = ["连衣裙 女 夏季 新款", "蓝色牛仔裤", "纯棉短袖T恤"]
    arrays = {f"c{i}": np.ones((2, 4), np.float16) for i in range(3)}
    write_feature_zip(tmp_path, "test", arrays)
    write_annotations(tmp_path, "test", [{"id": k, "title": t, "asr": "a red summer dress", "ocr": []}
                                         for k, t in zip(arrays, titles)])
    report = extract(tmp_path, ["test"], tmp_path / "c", options(frames=2, batch_size=2))["test"]
    unk = json.loads((tmp_path / "c" / "test.report.json").read_text())["text_unk"]
    assert unk == report["text_unk"]
    assert unk["title"]["unk_share"] > 0.5 and unk["title"]["tokens"] >= 12
    assert unk["asr"] == {"unk": 0, "tokens": 12, "unk_share": 0.0}           # 4 words x 3
    assert unk["ocr"] == {"unk": 0, "tokens": 0, "unk_share": None}
    err = capsys.readouterr().err
    assert "WARNING: test:" in err and "of the title tokens" in err and "--text-encoder bert:<dir>" in err
    assert f"{unk['title']['unk_share']:.1%}" in err and "asr tokens" not in err
    rerun = extract(tmp_path, ["test"], tmp_path / "c", options(frames=2, batch_size=2))["test"]
    assert rerun["text_unk"] == unk                                   # a resumed run counts no row twice


def test_a_store_made_in_fp32_refuses_an_extract_in_bf16_naming_precision(tmp_path):
    write_feature_zip(tmp_path, "test", {f"p{i}": np.ones((2, 4), np.float16) for i in range(2)})
    write_annotations(tmp_path, "test", [{"id": f"p{i}", "title": "x", "asr": "", "ocr": []} for i in range(2)])
    args = ["extract", "--data", str(tmp_path), "--out", str(tmp_path / "c"), "--device", "cpu", "--workers", "0",
            "--frames", "2", "--max-tokens", "8", "--no-aggregates"]
    result = CliRunner().invoke(cli, args)                                  # auto on the CPU: fp32
    assert result.exit_code == 0, result.output
    store = StoreReader(tmp_path / "c" / "test.h5")
    assert store.config["precision"] == "fp32" and json.loads(store.attrs["environment"])["device"] == "cpu"
    result = CliRunner().invoke(cli, args + ["--precision", "bf16"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "precision: 'fp32' -> 'bf16'" in result.output and "--overwrite" in result.output
    assert CliRunner().invoke(cli, args + ["--precision", "fp32"]).exit_code == 0      # same identity: resumes


def test_an_undecodable_video_file_is_masked_and_reported(tmp_path):
    write_mp4(tmp_path / "videos" / "test" / "m000.mp4", n_frames=6)
    (tmp_path / "videos" / "test" / "m001.mp4").write_bytes(b"\x00" * 100)
    write_annotations(tmp_path, "test", [{"id": f"m00{i}", "title": "x", "asr": "", "ocr": []} for i in range(2)])
    report = extract(tmp_path, ["test"], tmp_path / "c", options(frames=2, max_tokens=8))["test"]
    assert StoreReader(tmp_path / "c" / "test.h5").read(schema.FRAME_MASK, slice(None)).sum(1).tolist() == [2, 0]
    assert [(f["id"], f["reason"].split(":")[0]) for f in report["faults"]] == [("m001", "undecodable video")]
    assert report["fault_counts"] == {"undecodable video": 1} and report["faults"][0]["file"].endswith("m001.mp4")


def test_an_unknown_split_is_refused_before_any_encoder_is_loaded(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", n=2, faults=False)
    write_annotations(root, "test", [])

    def no_encoder(*args, **kwargs):
        raise AssertionError("an encoder was built before the splits were checked")
    monkeypatch.setattr("features.encoders.build_text_encoder", no_encoder)
    monkeypatch.setattr("features.encoders.build_frame_encoder", no_encoder)
    base = ["extract", "--data", str(root), "--out", str(tmp_path / "c"), "--device", "cpu", "--split", "labeled"]
    result = CliRunner().invoke(cli, base + ["--split", "nosuch"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "annotations/nosuch.json" in result.output and "labeled, test" in result.output
    result = CliRunner().invoke(cli, base[:-2] + ["--split", "test"])                # annotated, no frames
    assert result.exit_code == 1 and "no frames for split 'test'" in result.output, result.output
    result = CliRunner().invoke(cli, base + ["--frames-from", "npy"])
    assert result.exit_code == 1 and "zip_feats/labeled.zip" in result.output, result.output
    assert not (tmp_path / "c").exists()


def _done_rows(path):
    try:
        with h5py.File(path, "r", locking=False) as h5:
            return int(h5["done"][:].sum())
    except (OSError, KeyError):
        return 0


def test_killed_extract_resumes_to_the_same_content(tmp_path):
    """kill -9 a real extract (a process of its own) mid-way; the rerun finishes and equals an uninterrupted
    run (both in this process: the same command, one thread as in the killed process)."""
    root = make_dataset(tmp_path / "data", n=24)
    args = ["extract", "--data", root, "--split", "labeled", "--category-map", root / "category_map.csv",
            "--frames", "4", "--max-tokens", "16", "--batch-size", "2", "--workers", "0", "--device", "cpu",
            "--threads", "1", "--no-aggregates"]
    killed = tmp_path / "killed"
    proc = start(run_py(*args, "--out", killed))
    deadline = time.time() + 120
    while _done_rows(killed / "labeled.h5") < 6 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = _done_rows(killed / "labeled.h5")
    assert 6 <= interrupted_at < 24, "the run was not interrupted mid-way"
    assert not h5py.File(killed / "labeled.h5", "r")["done"][:].all()
    with pytest.raises(Exception, match="incomplete"):
        StoreReader(killed / "labeled.h5")

    cli_ok(*args, "--out", killed)
    cli_ok(*args, "--out", tmp_path / "whole")
    resumed, whole = StoreReader(killed / "labeled.h5"), StoreReader(tmp_path / "whole" / "labeled.h5")
    for name in sorted(whole.names):
        np.testing.assert_array_equal(resumed.read(name, slice(None)), whole.read(name, slice(None)), err_msg=name)
    assert json.loads((killed / "labeled.report.json").read_text())["faults"] == \
        json.loads((tmp_path / "whole" / "labeled.report.json").read_text())["faults"]


def test_the_default_two_worker_extract_equals_the_in_process_one(tmp_path):
    root = make_dataset(tmp_path / "data", n=8)
    common = ["--data", str(root), "--category-map", str(root / "category_map.csv"), "--frames", "4",
              "--max-tokens", "16", "--batch-size", "3", "--device", "cpu", "--no-aggregates"]
    result = CliRunner().invoke(cli, ["extract", *common, "--out", str(tmp_path / "w2")])   # --workers 2
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(cli, ["extract", *common, "--workers", "0", "--out", str(tmp_path / "w0")]).exit_code == 0
    two, zero = StoreReader(tmp_path / "w2" / "labeled.h5"), StoreReader(tmp_path / "w0" / "labeled.h5")
    assert two.attrs["complete"] and two.read(schema.FRAME_MASK, slice(None)).sum() > 0
    for name in sorted(zero.names):
        np.testing.assert_array_equal(two.read(name, slice(None)), zero.read(name, slice(None)), err_msg=name)
    reports = [json.loads((tmp_path / d / "labeled.report.json").read_text()) for d in ("w2", "w0")]
    assert reports[0]["faults"] == reports[1]["faults"] and reports[0]["n_videos_with_faults"] == 3


def test_limit_keeps_the_first_videos_and_is_part_of_the_config(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {f"f{i:03d}": rng.normal(size=(2, 8)).astype(np.float16) for i in range(6)}
    write_feature_zip(tmp_path, "test", arrays)
    write_annotations(tmp_path, "test", [{"id": k, "title": "x", "asr": "", "ocr": []} for k in arrays])
    extract(tmp_path, ["test"], tmp_path / "c", options(limit=3))
    store = StoreReader(tmp_path / "c" / "test.h5")
    assert list(store.ids) == ["f000", "f001", "f002"] and store.config["options"]["limit"] == 3
    with pytest.raises(Exception, match="options.limit: 3 -> None"):
        extract(tmp_path, ["test"], tmp_path / "c", options())


def test_threads_set_the_encoders_cpu_threads_without_changing_the_store(tmp_path, monkeypatch):
    import torch
    root = make_dataset(tmp_path / "data", n=4, faults=False)
    before = torch.get_num_threads()
    seen = []
    real_encode = FrameEncoder.encode
    monkeypatch.setattr(FrameEncoder, "encode", lambda self, images: seen.append(torch.get_num_threads())
                        or real_encode(self, images))
    try:
        extract(root, ["labeled"], tmp_path / "one", options(threads=1))
        assert seen and set(seen) == {1}
    finally:
        torch.set_num_threads(before)
    extract(root, ["labeled"], tmp_path / "default", options())
    one, default = StoreReader(tmp_path / "one" / "labeled.h5"), StoreReader(tmp_path / "default" / "labeled.h5")
    assert one.config == default.config                           # a runtime option, not the store's identity
    np.testing.assert_allclose(one.read("frame_emb", slice(None)).astype(np.float32),
                               default.read("frame_emb", slice(None)).astype(np.float32), atol=1e-2)
    with pytest.raises(ExtractError, match="--threads must be at least 0, got -1"):
        extract(root, ["labeled"], tmp_path / "bad", options(threads=-1))


def test_frames_are_encoded_in_bounded_chunks_with_the_same_result(extracted, tmp_path, monkeypatch):
    """--frame-batch bounds the images of one encoder forward (B x F would otherwise go at once) and
    leaves the embeddings as they were (the fixture ran with the CPU default of 32, i.e. unchunked here)."""
    from features import encoders
    root, cache, _ = extracted
    sizes, real_encode = [], encoders.FrameEncoder.encode
    monkeypatch.setattr(encoders.FrameEncoder, "encode", lambda self, images: sizes.append(len(images))
                        or real_encode(self, images))
    extract(root, ["labeled"], tmp_path, options(category_map=str(root / "category_map.csv"), frame_batch=3))
    assert sizes and max(sizes) <= 3
    chunked, whole = StoreReader(tmp_path / "labeled.h5"), StoreReader(cache / "labeled.h5")
    np.testing.assert_array_equal(chunked.read("frame_mask", slice(None)), whole.read("frame_mask", slice(None)))
    np.testing.assert_allclose(chunked.read("frame_emb", slice(None)).astype(np.float32),
                               whole.read("frame_emb", slice(None)).astype(np.float32), atol=2e-2, rtol=1e-2)
    with pytest.raises(Exception, match="--frame-batch must be at least 0"):
        extract(root, ["labeled"], tmp_path / "negative", options(frame_batch=-1))


def test_a_map_that_names_its_classes_gets_class_names(extracted):
    from features.class_names import load_class_names
    root, cache, _ = extracted
    names = load_class_names(cache, CATS)
    assert names.fine_emb.shape[0] == 3 and names.coarse_emb.shape[0] == 2
    with h5py.File(cache / "class_names.h5", "r") as h5:
        assert list(h5["fine_texts"].asstr()[:]) == ["a a0", "a a1", "b b0"]


def test_a_refused_extract_leaves_the_class_names_as_they_were(extracted, tmp_path):
    """Class names are written after the stores accept the run, so a refused run changes nothing."""
    root, cache, _ = extracted
    renamed = tmp_path / "renamed.csv"
    renamed.write_text(MAP_CSV.replace(",a0\n", ",wallets\n"))                 # same ids, one new name
    before = (cache / "class_names.h5").stat().st_mtime_ns
    with pytest.raises(Exception, match="options.max_tokens: 16 -> 32"):
        extract(root, ["labeled"], cache, options(category_map=str(renamed), max_tokens=32))
    assert (cache / "class_names.h5").stat().st_mtime_ns == before


def _niceness(_batch):
    return os.nice(0)


def test_a_decode_worker_on_the_cpu_yields_to_the_encoder():
    """extract's DataLoader workers on the CPU start with _yield_to_encoder: their niceness is the parent's
    plus WORKER_NICENESS (capped at 19), so the encoder's thread is not preempted by its own decoding."""
    from torch.utils.data import DataLoader
    from features.extract import WORKER_NICENESS, _yield_to_encoder
    loader = DataLoader(range(2), batch_size=1, num_workers=1, collate_fn=_niceness, worker_init_fn=_yield_to_encoder)
    assert list(loader) == [min(19, os.nice(0) + WORKER_NICENESS)] * 2
