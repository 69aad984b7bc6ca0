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
    path = write(tmp_path, entries)
    with pytest.raises(AnnotationError) as err:
        read_annotations(path, load_category_map())
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


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
