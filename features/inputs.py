"""What a store was made from: a cheap identity of a split's inputs, recorded in the store's `inputs`
attribute and compared when the store is resumed or reused (by `extract` and by `predict`).

    input_identity(ann_path, source, ids) -> {"annotations_sha256", "media_sha256", "media_files",
                                              "media_missing", "basis"}

The annotations file is hashed whole (its bytes: titles, OCR, ASR, ids); each media file (a frame zip,
a video, or the split's feature zip) is identified by its name, size and mtime_ns, not its bytes: one
stat per video instead of reading every frame again (the media are most of a dataset's bytes). Any
tool that writes new frames into a file changes its mtime; a copy that does not keep mtimes (cp
without -p) reads as changed too, which costs a rebuild, never a stale result.
"""
import hashlib
import json
from pathlib import Path

BASIS = "annotations: sha256 of the file; media: name, size and mtime_ns of each file"


def _sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def media_files(source, ids):
    """The media file of each video id (None when it has none), or the split's one file for a feature zip."""
    path = source.path
    if not callable(path):                 # features/frames.py NpyZipFrames: one zip for the split
        return [Path(path)]
    return [source.path(video_id) for video_id in ids]


def input_identity(ann_path, source, ids):
    """The identity of one split's inputs: its annotations' sha256 and its media files' stat digest."""
    h, present, missing = hashlib.sha256(), 0, 0
    for path in media_files(source, ids):
        if path is None or not Path(path).is_file():
            missing += 1
            h.update(b"missing\n")
            continue
        stat = Path(path).stat()
        present += 1
        h.update(json.dumps([Path(path).name, stat.st_size, stat.st_mtime_ns]).encode() + b"\n")
    return {"annotations_sha256": _sha256(ann_path), "media_sha256": h.hexdigest(), "media_files": present,
            "media_missing": missing, "basis": BASIS}
