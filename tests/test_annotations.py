import json

import pytest

from features.annotations import AnnotationError, read_annotations
from features.categories import CategoryMapError, load_category_map


def write(tmp_path, entries, name="labeled.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries) if not isinstance(entries, str) else entries)
    return path


def entry(vid="v001", **fields):
    return {"id": vid, "title": "t", "asr": "a", "ocr": [], "category_id": "0000", **fields}


def test_ocr_is_joined_in_time_order(tmp_path):
    ocr = [{"time": 3, "text": "third"}, {"time": 1, "text": "first"}, {"time": 2, "text": "second"}]
    (video,) = read_annotations(write(tmp_path, [entry(ocr=ocr)]), load_category_map())
    assert video.ocr == "first second third"
    assert video.texts == ("t", "first second third", "a")


def test_unlabelled_entries_have_no_category(tmp_path):
    e = entry()
    del e["category_id"]
    (video,) = read_annotations(write(tmp_path, [e]), load_category_map())
    assert video.category_id is None


def assert_refused_naming(tmp_path, entries, words):
    """The annotations `entries` are refused with an AnnotationError naming the file and every one of `words`."""
    path = write(tmp_path, entries)
    with pytest.raises(AnnotationError) as err:
        read_annotations(path, load_category_map())
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("entries, words", [
    ("{not json", ["labeled.json", "cannot read"]),
    ({"id": "x"}, ["expected a JSON list"]),
    ([entry(), {"title": "no id"}], ["entry 1", "'id' is missing"]),
    ([entry("v1"), entry("v2"), entry("v1")], ["'v1'", "duplicate id"]),
    ([entry("v7", category_id="9999")], ["'v7'", "'category_id'", "'9999'", "not in the category map"]),
    ([entry("v8", title=12)], ["'v8'", "'title'", "must be a string"]),
    ([entry("v9", asr=["x"])], ["'v9'", "'asr'"]),
    ([entry("v10", ocr="text")], ["'v10'", "'ocr'"]),
    ([entry("v11", ocr=[{"time": "late", "text": "x"}])], ["'v11'", "ocr[0].time"]),
])
def test_structural_faults_name_file_id_and_field(tmp_path, entries, words):
    assert_refused_naming(tmp_path, entries, words)


def test_builtin_map_is_the_challenge_200_classes():
    cmap = load_category_map()
    assert (cmap.n_fine, cmap.n_coarse) == (200, 23)
    # the coarse class is the first two characters of the category id
    assert all(cmap.coarse_ids[c] == f[:2] for f, c in zip(cmap.fine_ids, cmap.fine_to_coarse))


def test_category_map_without_columns_is_refused(tmp_path):
    path = tmp_path / "map.csv"
    path.write_text("id,parent\n0001,00\n")
    with pytest.raises(CategoryMapError, match="map.csv"):
        load_category_map(path)


@pytest.mark.parametrize("vid, why", [
    ("../v1", "path separator"), ("a/b", "path separator"), ("a\\b", "path separator"),
    ("/abs/v1", "path separator"), ("C:v1", "drive"), ("..", "'..'"), ("v..1", "'..'"), (".", "'.'"),
    ("v\x001", "control character"), ("v\n1", "control character"), ("v\ud8001", "surrogate"),
])
def test_a_video_id_is_a_name_not_a_path(tmp_path, vid, why):
    """An id becomes part of a frame zip's path (zip_frames/<split>/<id[-3:]>/<id>.zip), a member name
    (<id>.npy) and a video file's name: one that is a path would read outside the data root."""
    path = tmp_path / "labeled.json"
    path.write_text(json.dumps([entry("v0"), entry(vid)]), encoding="utf-8")
    with pytest.raises(AnnotationError) as err:
        read_annotations(path, load_category_map())
    message = str(err.value)
    assert str(path) in message and "entry 1" in message and repr(vid) in message and why in message
    assert "\n" not in message


@pytest.mark.parametrize("entries, words", [
    ([entry("v1"), entry("")], ["entry 1", "'id' is empty"]),
    ([entry(7)], ["entry 0", "'id' must be a string"]),
    ([entry("v2", category_id=1)], ["'v2'", "'category_id' must be a string"]),
    ([entry("v3", ocr=[{"time": 1}])], ["'v3'", "ocr[0].text", "missing"]),
    ([entry("v4", ocr=[{"time": 1, "text": 5}])], ["'v4'", "ocr[0].text", "must be a string"]),
    ([entry("v5", ocr=["x"])], ["'v5'", "ocr[0]", "must be an object"]),
    ([entry("v6", ocr=[{"time": True, "text": "x"}])], ["'v6'", "ocr[0].time", "must be a finite number"]),
    ([entry("v7", title={"a": 1})], ["'v7'", "'title'", "must be a string"]),
    pytest.param("[" * 100000, ["labeled.json", "cannot read"], id="nested-too-deep"),
])
def test_fields_of_the_wrong_type_name_file_entry_and_field(tmp_path, entries, words):
    assert_refused_naming(tmp_path, entries, words)


MAP_HEADER = "category_id,level1_id,level1_name,level2_name\n"


@pytest.mark.parametrize("body, words", [
    ("0001,00,a,x\n0002,00,a,y\n0001,00,a,z\n", ["line 4", "'0001'", "line 2", "duplicate"]),
    ("0001,00,a,x\n,00,a,y\n", ["line 3", "'category_id'", "empty"]),
    ("0001,00,a,x\n0002\n", ["line 3", "'level1_id'", "missing"]),
    ("0001,00,a,x\n0002,00,a,y,extra\n", ["line 3", "5 fields", "4"]),
    ("0001, ,a,x\n", ["line 2", "'level1_id'", "empty"]),
])
def test_a_malformed_category_map_row_is_named_by_line_and_field(tmp_path, body, words):
    path = tmp_path / "map.csv"
    path.write_text(MAP_HEADER + body, encoding="utf-8")
    with pytest.raises(CategoryMapError) as err:
        load_category_map(path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_category_map_that_is_not_utf8_text_is_refused_naming_it(tmp_path):
    path = tmp_path / "map.csv"
    path.write_bytes(MAP_HEADER.encode() + b"\xff\xfe0001,00,a,x\n")
    with pytest.raises(CategoryMapError, match="map.csv.*UTF-8"):
        load_category_map(path)
