"""Reads a split's annotations (the challenge's JSON list) into checked `Video` records.

Structural faults stop the run at once with an error naming the file, the id and the field: a whole
million-video run must not be built on a file that is wrong in its structure.
"""
import json
from dataclasses import dataclass
from pathlib import Path


class AnnotationError(ValueError):
    pass


@dataclass(frozen=True)
class Video:
    id: str
    title: str
    ocr: str                 # OCR texts joined in time order
    asr: str
    category_id: str | None  # None when unlabelled

    @property
    def texts(self):
        """(title, ocr, asr) in schema.TEXT_FIELDS order."""
        return self.title, self.ocr, self.asr


def annotations_path(data_dir, split):
    return Path(data_dir) / "annotations" / f"{split}.json"


def read_annotations(path, category_map=None):
    """All videos of one annotations file, in file order; checks ids, fields and categories."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            entries = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read annotations: {err}") from err
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: expected a JSON list of videos, got {type(entries).__name__}")
    videos, seen = [], {}
    for position, entry in enumerate(entries):
        video = _parse_entry(path, position, entry, category_map)
        if video.id in seen:
            raise AnnotationError(f"{path}: id {video.id!r}: duplicate id (entries {seen[video.id]} and {position})")
        seen[video.id] = position
        videos.append(video)
    return videos


def _parse_entry(path, position, entry, category_map):
    where = f"{path}: entry {position}"
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(entry).__name__}")
    vid = entry.get("id")
    if vid is None or vid == "":
        raise AnnotationError(f"{where}: field 'id' is missing")
    if not isinstance(vid, str):
        raise AnnotationError(f"{where}: field 'id' must be a string, got {type(vid).__name__}")
    where = f"{path}: id {vid!r}"
    title = _string_field(where, entry, "title")
    asr = _string_field(where, entry, "asr")
    ocr = _ocr_text(where, entry.get("ocr", []))
    category_id = entry.get("category_id")
    if category_id is not None:
        if not isinstance(category_id, str):
            raise AnnotationError(f"{where}: field 'category_id' must be a string, got {category_id!r}")
        if category_map is not None and category_map.fine_index(category_id) is None:
            raise AnnotationError(f"{where}: field 'category_id' {category_id!r} is not in the category map")
    return Video(vid, title, ocr, asr, category_id)


def _string_field(where, entry, field):
    value = entry.get(field, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AnnotationError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _ocr_text(where, ocr):
    """OCR is [{time, text}]: join the texts in time order."""
    if ocr is None:
        return ""
    if not isinstance(ocr, list):
        raise AnnotationError(f"{where}: field 'ocr' must be a list of {{time, text}}, got {type(ocr).__name__}")
    pieces = []
    for k, item in enumerate(ocr):
        if not isinstance(item, dict) or not isinstance(item.get("text", ""), str):
            raise AnnotationError(f"{where}: field 'ocr[{k}]' must be {{time: number, text: string}}")
        time = item.get("time", 0)
        if not isinstance(time, (int, float)):
            raise AnnotationError(f"{where}: field 'ocr[{k}].time' must be a number, got {time!r}")
        pieces.append((time, k, item.get("text", "")))
    return " ".join(text for _, _, text in sorted(pieces) if text)
