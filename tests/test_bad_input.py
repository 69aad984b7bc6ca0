"""Hostile input: one line naming the file, the id and the field, exit 1; or a counted skip, reported.

docs/bad-input.md lists every kind with what the user sees; these tests hold the ones it added."""
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from features.frames import FrameSourceError, JpegZipFrames, MediaFault, NpyZipFrames
from neural.folds import rare_classes_warning
from run import INTERRUPTED, cli
from stacking.pipeline import StackOptions, stack
from stacking.rundir import RunDirError
from tests.fakes import write_fake_store
from tests.media import jpeg_bytes, write_annotations, write_feature_zip, write_jpeg_zip
from tests.fake_runs import write_fake_run

REPO = Path(__file__).resolve().parents[1]
EXTRACT = ["--device", "cpu", "--workers", "0", "--frames", "2", "--max-tokens", "8", "--no-aggregates"]


def one_line_error(result, *words):
    """The command failed with exit 1 and a single 'Error: ...' line holding every word."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def stand_in_encoders(monkeypatch):
    """Stand-ins for the encoders (the refusals come before either encodes anything); returns the list of
    encoders built, to show which refusals come before any loads."""
    built = []

    def build(kind):
        def builder(*args, **kwargs):
            built.append(kind)
            return SimpleNamespace(max_tokens=512, dim=8)
        return builder
    monkeypatch.setattr("features.encoders.build_frame_encoder", build("frame"))
    monkeypatch.setattr("features.encoders.build_text_encoder", build("text"))
    return built


# --- frames: reported for people, counted under whole keys -------------------------------------

def test_a_non_image_member_is_named_by_zip_and_member_not_by_a_memory_buffer(tmp_path):
    write_jpeg_zip(tmp_path, "test", "v001", [(0, 0, 0)], extra={"1.txt": b"release notes"})
    loaded = JpegZipFrames(tmp_path, "test", 8).load("v001")
    (fault,) = loaded.faults
    assert fault.file.endswith("v001.zip") and fault.kind == "corrupt JPEG"
    assert fault.reason.startswith("corrupt JPEG 1.txt: not an image")
    assert "BytesIO" not in fault.reason and " at 0x" not in fault.reason


def test_a_zip_without_a_decodable_frame_counts_under_a_whole_key(tmp_path):
    write_jpeg_zip(tmp_path, "test", "v001", [], extra={"0.jpg": b"not a jpeg", "1.jpg": b"nor this"})
    with pytest.raises(MediaFault) as err:
        JpegZipFrames(tmp_path, "test", 8).load("v001")
    assert err.value.kind == "no decodable frame"
    assert "0.jpg" in err.value.reason and "1.jpg" in err.value.reason and "BytesIO" not in err.value.reason


def _damage(path, how):
    """Damage the zip's only member: 'stream' makes its deflate stream invalid (zlib.error), 'encrypted'
    marks it encrypted (RuntimeError without a password)."""
    data = bytearray(path.read_bytes())
    if how == "stream":
        name_len, extra_len = struct.unpack("<HH", data[26:30])
        data[30 + name_len + extra_len] = 0xFF            # BTYPE 11: a reserved deflate block type
    else:
        central = data.index(b"PK\x01\x02")
        data[central + 8] |= 0x01                         # general purpose flag bit 0: encrypted
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["stream", "encrypted"])
def test_a_damaged_or_encrypted_member_is_a_counted_fault(tmp_path, how):
    jpeg_zip = tmp_path / "zip_frames" / "test" / "001" / "v001.zip"
    jpeg_zip.parent.mkdir(parents=True)
    with zipfile.ZipFile(jpeg_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("0.jpg", jpeg_bytes((9, 9, 9)))
    _damage(jpeg_zip, how)
    with pytest.raises(MediaFault) as err:
        JpegZipFrames(tmp_path, "test", 8).load("v001")
    assert err.value.kind == "no decodable frame" and "corrupt JPEG 0.jpg" in err.value.reason

    buf = io.BytesIO()
    np.save(buf, np.ones((2, 4), np.float16))
    feature_zip = tmp_path / "zip_feats" / "test.zip"
    feature_zip.parent.mkdir(parents=True)
    with zipfile.ZipFile(feature_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("v001.npy", buf.getvalue())
    _damage(feature_zip, how)
    with pytest.raises(MediaFault) as err:
        NpyZipFrames(tmp_path, "test", 2).load("v001")
    assert err.value.kind == "unreadable npy" and err.value.file.endswith("test.zip:v001.npy")


def test_an_npz_or_a_pickle_under_an_npy_name_is_unreadable_not_loaded(tmp_path):
    npz, pickled = io.BytesIO(), io.BytesIO()
    np.savez(npz, x=np.ones((2, 4), np.float16))
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path = tmp_path / "zip_feats" / "test.zip"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("z.npy", npz.getvalue())
        zf.writestr("p.npy", pickled.getvalue())
    source = NpyZipFrames(tmp_path, "test", 2)
    for vid in ("z", "p"):
        with pytest.raises(MediaFault) as err:
            source.load(vid)
        assert err.value.kind == "unreadable npy"


def test_two_members_for_one_video_are_refused_naming_both(tmp_path):
    path = write_feature_zip(tmp_path, "test", {"v1": np.ones((2, 4), np.float16)})
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("old/v1.npy", b"")
    with pytest.raises(FrameSourceError, match=r"test\.zip: members 'v1.npy' and 'old/v1.npy'.*'v1'"):
        NpyZipFrames(tmp_path, "test", 2).load("v1")


def test_a_frame_source_never_builds_a_path_from_an_id_that_is_a_path(tmp_path):
    write_jpeg_zip(tmp_path, "other", "x001", [(0, 0, 0)])
    with pytest.raises(MediaFault, match="not a name"):
        JpegZipFrames(tmp_path, "test", 8).load("../other/001/x001")


# --- extract: refused in one line ------------------------------------------------------------------

def test_a_feature_zip_that_is_not_a_zip_is_refused_before_any_encoder_loads(tmp_path, stand_in_encoders):
    (tmp_path / "zip_feats").mkdir()
    (tmp_path / "zip_feats" / "test.zip").write_bytes(b"features, honestly")
    write_annotations(tmp_path, "test", [{"id": "a", "title": "x"}])
    result = CliRunner().invoke(cli, ["extract", "--data", str(tmp_path), "--out", str(tmp_path / "c"), *EXTRACT])
    one_line_error(result, "test.zip", "not a readable zip")
    assert stand_in_encoders == []
    assert not (tmp_path / "c" / "test.h5").exists()


@pytest.mark.parametrize("extra, words", [([], ["test.json", "split 'test' lists no videos"]),
                                          (["--limit", "0"], ["--limit", "at least 1"])])
def test_a_split_without_videos_is_refused_naming_its_file(tmp_path, stand_in_encoders, extra, words):
    write_feature_zip(tmp_path, "test", {"a": np.ones((2, 4), np.float16)})
    write_annotations(tmp_path, "test", [] if not extra else [{"id": "a", "title": "x"}])
    result = CliRunner().invoke(cli, ["extract", "--data", str(tmp_path), "--out", str(tmp_path / "c"),
                                      *EXTRACT, *extra])
    one_line_error(result, *words)
    assert not (tmp_path / "c" / "test.h5").exists()


def test_an_id_that_is_a_path_stops_extract_naming_file_entry_and_id(tmp_path, stand_in_encoders):
    write_feature_zip(tmp_path, "test", {"v001": np.ones((2, 4), np.float16)})
    write_jpeg_zip(tmp_path, "outside", "x001", [(0, 0, 0)])
    write_annotations(tmp_path, "test", [{"id": "v001"}, {"id": "../../outside/001/x001"}])
    result = CliRunner().invoke(cli, ["extract", "--data", str(tmp_path), "--out", str(tmp_path / "c"), *EXTRACT])
    one_line_error(result, "test.json", "entry 1", "'../../outside/001/x001'", "not paths")


# --- train-neural and stack: labels that cannot be learnt or stacked --------------------------------

TRAIN = ["--models", "linear", "--epochs", "1", "--hidden", "8", "--batch-size", "8", "--threads", "1", "--workers", "0"]


def test_train_neural_refuses_a_cache_without_labelled_rows(tmp_path):
    write_fake_store(tmp_path / "cache" / "labeled.h5", n=12, labelled=False)
    result = CliRunner().invoke(cli, ["train-neural", "--cache", str(tmp_path / "cache"), "--out",
                                      str(tmp_path / "run"), "--folds", "3", *TRAIN])
    one_line_error(result, "labeled.h5", "no labelled rows")


def test_train_neural_refuses_labelled_rows_of_one_class(tmp_path):
    write_fake_store(tmp_path / "cache" / "labeled.h5", n=12, n_classes=1)
    result = CliRunner().invoke(cli, ["train-neural", "--cache", str(tmp_path / "cache"), "--out",
                                      str(tmp_path / "run"), "--folds", "3", *TRAIN])
    one_line_error(result, "labeled.h5", "one class", "'0000'", "at least two")
    assert "F1" not in result.output


def test_classes_rarer_than_the_folds_are_named_with_what_happens_to_them():
    labels = np.array([0] * 6 + [1] * 2 + [2] + [3] * 5)            # (N,) classes 1 and 2 have < 5 items
    line = rare_classes_warning(labels, 5, ["0000", "0001", "0100", "0101"], "labeled.h5")
    assert line.startswith("WARNING: labeled.h5: 2 classes have fewer labelled videos than the 5 folds")
    assert "'0001' (2)" in line and "'0100' (1)" in line and "'0000'" not in line and "'0101'" not in line
    assert "never predicted out-of-fold" in line and "\n" not in line
    assert rare_classes_warning(labels, 1, ["0000", "0001", "0100", "0101"], "labeled.h5") is None


def test_train_neural_warns_about_rare_classes_and_trains_them(tmp_path):
    write_fake_store(tmp_path / "cache" / "labeled.h5", n=20, n_classes=6)     # 4, 4, 3, 3, 3, 3 videos
    result = CliRunner().invoke(cli, ["train-neural", "--cache", str(tmp_path / "cache"), "--out",
                                      str(tmp_path / "run"), "--folds", "4", *TRAIN])
    assert result.exit_code == 0, result.output
    assert "WARNING: " in result.output and "4 classes have fewer labelled videos than the 4 folds" in result.output
    assert "linear: OOF mean-F1" in result.output


def test_stack_refuses_a_run_whose_labelled_videos_hold_one_class(tmp_path):
    """(A fake run has no fold models: `stack` on the command line refuses it for that first, so the stage
    is called directly here; its RunDirError is one of the project's one-line errors.)"""
    run_dir, _ = write_fake_run(tmp_path, n=30, n_test=6, n_classes=1)
    with pytest.raises(RunDirError) as err:
        stack(run_dir, tmp_path / "stack", StackOptions(params={"n_rounds": 5}))
    assert "predictions.h5" in str(err.value) and "one class ('0000')" in str(err.value)
    assert "at least two" in str(err.value)
    assert not (tmp_path / "stack" / "submission.csv").exists()


# --- Ctrl-C ------------------------------------------------------------------------------------------

def test_an_interrupted_command_exits_130_with_one_line(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("features.extract.extract", interrupted)
    write_annotations(tmp_path, "test", [{"id": "a"}])
    result = CliRunner().invoke(cli, ["extract", "--data", str(tmp_path), "--out", str(tmp_path / "c")])
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines() == [INTERRUPTED] and "Aborted" not in result.output


def test_sigint_during_a_real_command_exits_130_and_writes_nothing(tmp_path):
    """A real SIGINT to `python run.py extract` while it waits, early, on a category map that is a FIFO."""
    write_feature_zip(tmp_path, "test", {"a": np.ones((2, 4), np.float16)})
    write_annotations(tmp_path, "test", [{"id": "a"}])
    fifo = tmp_path / "map.csv"
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "extract", "--data", str(tmp_path), "--out",
                             str(tmp_path / "c"), "--category-map", str(fifo), *EXTRACT], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer, deadline = None, time.time() + 120
    while writer is None and time.time() < deadline and proc.poll() is None:
        try:                                    # succeeds once extract has the FIFO open to read the map
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.05)
    assert writer is not None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    os.close(writer)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in err
    assert not (tmp_path / "c" / "test.h5").exists()
