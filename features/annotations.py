"""Reads a split's annotations (the challenge's JSON list) into checked `Video` records.

Structural faults stop the run at once with an error naming the file, the id and the field: a whole
million-video run must not be built on a file that is wrong in its structure.
"""
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath


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
    except RecursionError as err:       # json's parser recurses once per nesting level
        raise AnnotationError(f"{path}: cannot read annotations: nested too deeply for a list of videos") from err
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
    if vid is None:
        raise AnnotationError(f"{where}: field 'id' is missing")
    if not isinstance(vid, str):
        raise AnnotationError(f"{where}: field 'id' must be a string, got {type(vid).__name__}")
    if vid == "":
        raise AnnotationError(f"{where}: field 'id' is empty")
    problem = id_problem(vid)
    if problem:
        raise AnnotationError(f"{where}: id {vid!r}: video ids are names, not paths: {problem}")
    where = f"{path}: entry {position}, id {vid!r}"
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


def id_problem(vid):
    """Why `vid` cannot be a video id, or None. An id becomes a file or member name (<id>.zip under
    zip_frames/<split>/<id[-3:]>/, <id>.npy, <id>.mp4), so it must name, never point: no path separator,
    no '.', '..' or drive, nothing a file name cannot hold."""
    if "/" in vid or "\\" in vid:
        return "it holds a path separator ('/' or '\\')"
    if vid == ".":
        return "'.' is the folder itself"
    if ".." in vid:
        return "it holds '..'"
    if PureWindowsPath(vid).drive:
        return "it starts with a drive ('C:')"
    for char in vid:
        category = unicodedata.category(char)
        if category == "Cc":
            return f"it holds the control character {char!r}"
        if category == "Cs":
            return f"it holds a lone surrogate {char!r} (not UTF-8 text)"
    return None


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
        if not isinstance(item, dict):
            raise AnnotationError(f"{where}: field 'ocr[{k}]' must be an object {{time, text}}, "
                                  f"got {type(item).__name__}")
        if "text" not in item:
            raise AnnotationError(f"{where}: field 'ocr[{k}].text' is missing")
        text = "" if item["text"] is None else item["text"]
        if not isinstance(text, str):
            raise AnnotationError(f"{where}: field 'ocr[{k}].text' must be a string, got {type(text).__name__}")
        time = item.get("time", 0)
        if isinstance(time, bool) or not isinstance(time, (int, float)) or not math.isfinite(time):
            raise AnnotationError(f"{where}: field 'ocr[{k}].time' must be a finite number, got {time!r}")
        pieces.append((time, k, text))
    return " ".join(text for _, _, text in sorted(pieces) if text)
