import numpy as np
import pytest

from features.frames import (FrameSourceError, JpegZipFrames, MediaFault, NpyZipFrames, VideoFileFrames,
                             detect_source, uniform_indices)
from tests.media import jpeg_bytes, write_feature_zip, write_jpeg_zip, write_mp4


def test_uniform_sampling_keeps_time_order_and_ends():
    assert uniform_indices(3, 8).tolist() == [0, 1, 2]
    idx = uniform_indices(100, 5)
    assert idx.tolist() == [0, 25, 50, 74, 99]


def test_jpeg_zip_frames_in_numeric_order(tmp_path):
    colours = [(10 * i, 0, 0) for i in range(12)]        # 10.jpg must come after 9.jpg
    write_jpeg_zip(tmp_path, "test", "v123", colours)
    loaded = JpegZipFrames(tmp_path, "test", n_frames=32).load("v123")
    reds = [image.getpixel((5, 5))[0] for image in loaded.frames]
    assert len(reds) == 12 and reds == sorted(reds)


def test_corrupt_jpeg_is_dropped_and_reported(tmp_path):
    write_jpeg_zip(tmp_path, "test", "v001", [(0, 0, 0)] * 2, extra={"2.jpg": jpeg_bytes((1, 1, 1))[:40]})
    loaded = JpegZipFrames(tmp_path, "test", n_frames=32).load("v001")
    assert len(loaded.frames) == 2
    assert len(loaded.faults) == 1 and "corrupt JPEG 2.jpg" in loaded.faults[0].reason
    assert loaded.faults[0].kind == "corrupt JPEG" and loaded.faults[0].file.endswith("v001.zip")


@pytest.mark.parametrize("make, reason", [
    (lambda d: None, "missing zip"),
    (lambda d: write_jpeg_zip(d, "test", "v001", []), "zero frames"),
    (lambda d: write_jpeg_zip(d, "test", "v001", [], extra={"0.jpg": b"not a jpeg"}), "no decodable frame"),
])
def test_whole_video_faults_name_the_file(tmp_path, make, reason):
    make(tmp_path)
    with pytest.raises(MediaFault) as err:
        JpegZipFrames(tmp_path, "test", 8).load("v001")
    assert reason in err.value.reason and err.value.file.endswith("v001.zip")


def test_npy_features_sampled_and_checked(tmp_path):
    good = np.arange(40 * 6, dtype=np.float16).reshape(40, 6)
    bad_nan = good.copy()
    bad_nan[3, 1] = np.nan
    huge = good.astype(np.float32)
    huge[0, 0] = 70000
    write_feature_zip(tmp_path, "test", {"a": good, "b": good.astype(np.int16), "c": good[:, :5],
                                         "d": bad_nan, "e": good[:0], "f": good.astype(np.float64),
                                         "g": huge, "h": bad_nan.astype(np.float32)})
    source = NpyZipFrames(tmp_path, "test", n_frames=8)
    source.dim = source.probe_dim()
    assert source.dim == 6
    loaded = source.load("a")
    assert loaded.frames.shape == (8, 6) and loaded.frames[0, 0] == 0 and loaded.frames[-1, 0] == good[-1, 0]
    wide = source.load("f")                                 # float64 in range: cast, not dropped
    assert wide.frames.dtype == np.float16 and np.array_equal(wide.frames, loaded.frames)
    for vid, reason in [("b", "dtype int16"), ("c", "shape"), ("d", "NaN or inf"), ("e", "zero frames"),
                        ("g", "float16 overflow.*70000"), ("h", "NaN or inf"), ("zz", "missing npy member")]:
        with pytest.raises(MediaFault, match=reason):
            source.load(vid)


def test_video_files_decoded_with_pyav(tmp_path):
    write_mp4(tmp_path / "videos" / "test" / "v001.mp4", n_frames=20)
    (tmp_path / "videos" / "test" / "v002.mp4").write_bytes(b"\x00" * 100)
    source = VideoFileFrames(tmp_path, "test", n_frames=4)
    loaded = source.load("v001")
    assert len(loaded.frames) == 4
    brightness = [np.asarray(f).mean() for f in loaded.frames]
    assert brightness == sorted(brightness)               # sampled in time order across the clip
    with pytest.raises(MediaFault, match="undecodable"):
        source.load("v002")
    with pytest.raises(MediaFault, match="missing video"):
        source.load("v003")


def test_layout_detection(tmp_path):
    with pytest.raises(FileNotFoundError, match="no frames for split 'test'"):
        detect_source(tmp_path, "test")
    write_jpeg_zip(tmp_path, "test", "v001", [(0, 0, 0)])
    assert detect_source(tmp_path, "test") == "zip"
    write_feature_zip(tmp_path, "test", {})
    with pytest.raises(FrameSourceError, match="several layouts"):
        detect_source(tmp_path, "test")
