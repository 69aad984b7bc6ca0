"""Property-based tests of the three readers where outside data enters: the annotations, the category map
and the feature zip. Whatever they are given, they return a valid result or raise one of the project's own
errors (run.is_project_error: what the command line shows as one line); never anything else.

Bounded for the default suite (FUZZ_EXAMPLES examples per property, 60 unless set); a longer hunt:
FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz_readers.py
"""
import csv
import io
import json
import math
import os
import zipfile
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from features.annotations import id_problem, read_annotations
from features.categories import MAP_COLUMNS, load_category_map
from features.frames import NpyZipFrames
from run import is_project_error

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)), deadline=timedelta(seconds=5),
                database=None, suppress_health_check=[HealthCheck.too_slow])
CMAP = load_category_map()
FIELDS = ["id", "title", "asr", "ocr", "category_id", "time", "text"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def outcome(read, *args):
    """read(*args), or None when it raised a project error; any other exception fails the property."""
    try:
        result = read(*args)
    except Exception as err:                     # noqa: BLE001 - the contract is about every exception
        if is_project_error(err):
            assert str(err), f"{type(err).__name__} without a message"
            event(f"{read.__name__}: {type(err).__name__}")      # --hypothesis-show-statistics
            return None
        raise
    event(f"{read.__name__}: valid")
    return result


# --- annotations -----------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=8) | st.sampled_from(CMAP.fine_ids[:3] + ["v1", "v2", "../x", ""]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=5),
                           max_leaves=24)
texts = st.text(max_size=8)
valid_entries = st.fixed_dictionaries(
    {"id": st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=5)},
    optional={"title": texts, "asr": texts, "category_id": st.sampled_from(CMAP.fine_ids[:3]),
              "ocr": st.lists(st.fixed_dictionaries({"time": st.integers(0, 9), "text": texts}), max_size=3)})
entries = (valid_entries                                                          # valid (ids may repeat)
           | st.tuples(valid_entries, st.sampled_from(FIELDS), json_values).map(   # one field replaced
               lambda e: {**e[0], e[1]: e[2]})
           | st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6))  # anything in the fields
annotation_files = (st.lists(entries, max_size=5).map(json.dumps) | json_values.map(json.dumps)
                    | st.binary(max_size=64))


@FUZZ
@given(content=annotation_files)
def test_the_annotation_reader_returns_valid_videos_or_a_project_error(workdir, content):
    path = workdir / "annotations.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    videos = outcome(read_annotations, path, CMAP)
    if videos is None:
        return
    assert len({v.id for v in videos}) == len(videos)
    for video in videos:
        assert isinstance(video.id, str) and video.id and id_problem(video.id) is None
        assert all(isinstance(text, str) for text in video.texts)
        assert video.category_id is None or CMAP.fine_index(video.category_id) is not None


# --- category map ----------------------------------------------------------------------------------

cells = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6) | st.sampled_from(["00", "0001", ""])
headers = st.just(list(MAP_COLUMNS)) | st.lists(st.sampled_from(MAP_COLUMNS) | cells, max_size=5)
valid_rows = st.tuples(st.from_regex(r"[0-9]{4}", fullmatch=True), st.sampled_from(["00", "01", "02"]),
                       cells, cells).map(list)
rows = valid_rows | st.lists(cells, max_size=6)
map_files = (st.tuples(headers, st.lists(rows, max_size=6)).map(lambda hr: _csv_text([hr[0], *hr[1]]).encode())
             | st.binary(max_size=80))


def _csv_text(rows):
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


@FUZZ
@given(content=map_files)
def test_the_category_map_reader_returns_a_valid_map_or_a_project_error(workdir, content):
    path = workdir / "map.csv"
    path.write_bytes(content)
    cmap = outcome(load_category_map, path)
    if cmap is None:
        return
    assert cmap.n_fine > 0 and len(set(cmap.fine_ids)) == cmap.n_fine and cmap.fine_ids == sorted(cmap.fine_ids)
    assert all(c.strip() for c in cmap.fine_ids) and len(cmap.fine_to_coarse) == cmap.n_fine
    assert all(0 <= c < cmap.n_coarse for c in cmap.fine_to_coarse)
    assert len(cmap.fine_names) == cmap.n_fine and len(cmap.coarse_names) == cmap.n_coarse


# --- feature zip -----------------------------------------------------------------------------------

arrays = hnp.arrays(st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.bool_, np.complex64]),
                    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))   # NaN and inf included


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


features = hnp.arrays(st.sampled_from([np.float16, np.float32]), st.tuples(st.integers(1, 5), st.integers(1, 4)),
                      elements=st.floats(-1e4, 1e4, width=16))                   # valid (n, D) features
member_data = (features.map(_npy_bytes) | arrays.map(_npy_bytes) | st.binary(max_size=80)
               | st.tuples(arrays.map(_npy_bytes), st.integers(0, 200)).map(lambda bi: bi[0][:bi[1]]))
member_names = st.sampled_from(["v1.npy", "v2.npy", "d/v1.npy", "v1.npz", "x"]) | st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=6).map(lambda t: t + ".npy")


@st.composite
def feature_zips(draw):
    """The bytes of a feature zip: random members (names, .npy or not, truncated or not), stored or
    deflated, then maybe a few bytes overwritten; or random bytes."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=200))
    buf = io.BytesIO()
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in draw(st.lists(st.tuples(member_names, member_data), max_size=4)):
            zf.writestr(name, data)
    data = bytearray(buf.getvalue())
    damage = st.tuples(st.integers(0, max(len(data) - 1, 0)), st.integers(0, 255))
    for position, value in draw(st.just([]) | st.lists(damage, max_size=3)):
        if data:
            data[position] = value
    return bytes(data)


@pytest.mark.filterwarnings("ignore:Duplicate name")      # zipfile warns when a drawn zip repeats a name
@FUZZ
@given(content=feature_zips(), video_id=st.sampled_from(["v1", "v2", "x"]) | st.text(max_size=4))
def test_the_feature_zip_reader_returns_valid_frames_or_a_project_error(workdir, content, video_id):
    (workdir / "zip_feats").mkdir(exist_ok=True)
    (workdir / "zip_feats" / "test.zip").write_bytes(content)
    source = NpyZipFrames(workdir, "test", n_frames=3)
    dim = outcome(source.probe_dim)
    assert dim is None or (isinstance(dim, int) and dim > 0)
    source.dim = dim
    loaded = outcome(source.load, video_id)
    if loaded is None:
        return
    frames = loaded.frames                                   # (n, D) float16, 1 <= n <= n_frames
    assert frames.dtype == np.float16 and frames.ndim == 2 and 1 <= len(frames) <= 3 and frames.shape[1] > 0
    assert dim is None or frames.shape[1] == dim
    assert np.isfinite(frames).all() and not math.isnan(float(frames.sum(dtype=np.float32)))
