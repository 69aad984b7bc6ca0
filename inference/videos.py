"""Videos given in memory (the Python API's records) -> a dataset in the challenge layout, so they go through
the same extract as `predict`'s files do.

A record is a dict: id, title, asr, ocr (a string or [{time, text}]) and frames, one of
    image files       a list of paths (JPEG, PNG, ...), in time order   -> zip_frames/<split>/<id[-3:]>/<id>.zip
    decoded images    a list of (H, W, 3) uint8 arrays (or PIL images), or one (F, H, W, 3) uint8 array -> the same
                      zip, each frame PNG-encoded (lossless: the encoder sees these very pixels)
    a video file      one path (.mp4, .mkv, ...)                        -> videos/<split>/<id>.<suffix> (a link)
    frame features    one (F, D) float array                            -> zip_feats/<split>.zip as <id>.npy
    nothing           frames left out or None: the video's frames are masked (as a missing zip in `predict`)
Image files are stored byte for byte, so a video labels as it would from a challenge zip of the same files.
"""
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from features.annotations import id_problem
from features.frames import VIDEO_SUFFIXES


class VideoRecordError(ValueError):
    pass


LAYOUT_OF = {"image files": "zip", "decoded images": "zip", "video file": "video", "frame features": "npy"}


def frames_kind(video_id, frames):
    """Which kind of frames a record holds (a key of LAYOUT_OF), or None for none."""
    if frames is None or (isinstance(frames, (list, tuple)) and not frames):
        return None
    if isinstance(frames, (str, os.PathLike)):
        if Path(frames).suffix.lower() in VIDEO_SUFFIXES:
            return "video file"
        raise VideoRecordError(f"video {video_id!r}: field frames is one path, {frames}, not a video file "
                               f"({', '.join(VIDEO_SUFFIXES)}); give image files as a list of paths")
    if isinstance(frames, np.ndarray):
        if frames.ndim == 2 and np.issubdtype(frames.dtype, np.floating):
            return "frame features"
        if frames.ndim == 4 and frames.dtype == np.uint8 and frames.shape[-1] == 3:
            return "decoded images"
        raise VideoRecordError(f"video {video_id!r}: field frames is an array of shape {frames.shape} and dtype "
                               f"{frames.dtype}; expected (F, D) float features or (F, H, W, 3) uint8 images")
    if isinstance(frames, (list, tuple)):
        if all(isinstance(f, (str, os.PathLike)) for f in frames):
            return "image files"
        if all(_is_image(f) for f in frames):
            return "decoded images"
    raise VideoRecordError(f"video {video_id!r}: field frames must be a list of image paths, a list of (H, W, 3) "
                           "uint8 arrays, a video file path or an (F, D) float array")


def _is_image(frame):
    from PIL import Image
    if isinstance(frame, Image.Image):
        return True
    return isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[-1] == 3 and frame.dtype == np.uint8


def check_videos(videos, trained_frame_encoder):
    """The records' ids and the one layout their frames share; refuses frames the model cannot take
    (raw frames for a model trained on precomputed features, or the reverse) before anything is written."""
    if isinstance(videos, dict) or not hasattr(videos, "__iter__"):
        raise VideoRecordError("videos: expected a list of records (dicts with id, title, asr, ocr, frames)")
    videos = list(videos)
    if not videos:
        raise VideoRecordError("videos: the list is empty; give at least one video")
    kinds, seen = {}, set()
    for position, video in enumerate(videos):
        if not isinstance(video, dict):
            raise VideoRecordError(f"videos[{position}]: expected a dict, got {type(video).__name__}")
        vid = video.get("id")
        if not isinstance(vid, str) or not vid:
            raise VideoRecordError(f"videos[{position}]: field id must be a non-empty string, got {vid!r}")
        problem = id_problem(vid)
        if problem:
            raise VideoRecordError(f"videos[{position}]: id {vid!r}: video ids are names, not paths: {problem}")
        if vid in seen:
            raise VideoRecordError(f"videos[{position}]: id {vid!r}: duplicate id")
        seen.add(vid)
        kind = frames_kind(vid, video.get("frames"))
        if kind is not None:
            kinds.setdefault(kind, vid)
    return _one_layout(kinds, trained_frame_encoder)


def _one_layout(kinds, trained):
    precomputed = trained == "precomputed"
    for kind, vid in kinds.items():
        if precomputed != (kind == "frame features"):
            wanted = ("precomputed frame features, an (F, D) float array" if precomputed
                      else f"raw frames (image files, decoded images or a video file) for its frame encoder {trained}")
            raise VideoRecordError(f"video {vid!r}: field frames holds {kind}, but the model was trained on {wanted}")
    layouts = {LAYOUT_OF[kind]: vid for kind, vid in kinds.items()}
    if len(layouts) > 1:
        named = ", ".join(f"{layout} for {vid!r}" for layout, vid in layouts.items())
        raise VideoRecordError(f"videos: frames come in more than one layout ({named}); give image frames and "
                               "video files in separate calls")
    if layouts:
        return next(iter(layouts))
    if precomputed:
        raise VideoRecordError("videos: no video has frames, and the model needs (F, D) frame features for some")
    return "zip"


def write_dataset(videos, data_dir, split, layout):
    """The records as DATA_DIR in the challenge layout (annotations/<split>.json and the frames)."""
    data_dir = Path(data_dir)
    entries = [{"id": v["id"], "title": v.get("title", ""), "asr": v.get("asr", ""), "ocr": _ocr(v.get("ocr"))}
               for v in videos]
    (data_dir / "annotations").mkdir(parents=True)
    (data_dir / "annotations" / f"{split}.json").write_text(json.dumps(entries), encoding="utf-8")
    if layout == "npy":
        _write_features(videos, data_dir / "zip_feats" / f"{split}.zip")
        return
    root = data_dir / ("zip_frames" if layout == "zip" else "videos") / split
    root.mkdir(parents=True)
    for video in videos:
        frames = video.get("frames")
        if frames is None or (isinstance(frames, (list, tuple)) and not frames):
            continue
        if layout == "video":
            path = Path(frames).resolve()
            if not path.is_file():
                raise VideoRecordError(f"video {video['id']!r}: field frames: {frames}: no such video file")
            (root / f"{video['id']}{path.suffix.lower()}").symlink_to(path)
        else:
            zip_path = root / video["id"][-3:] / f"{video['id']}.zip"
            zip_path.parent.mkdir(exist_ok=True)
            _write_image_zip(video["id"], frames, zip_path)


def _ocr(ocr):
    """A string is one OCR text at time 0; a list is the challenge's [{time, text}] (checked on reading)."""
    return [{"time": 0, "text": ocr}] if isinstance(ocr, str) else ocr


def _write_image_zip(video_id, frames, zip_path):
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:
        for i, frame in enumerate(frames):
            if isinstance(frame, (str, os.PathLike)):
                path = Path(frame)
                if not path.is_file():
                    raise VideoRecordError(f"video {video_id!r}: field frames[{i}]: {frame}: no such image file")
                zf.writestr(f"{i}{path.suffix.lower() or '.jpg'}", path.read_bytes())
            else:
                zf.writestr(f"{i}.png", _png(frame))


def _png(frame):
    from PIL import Image
    image = frame if isinstance(frame, Image.Image) else Image.fromarray(np.ascontiguousarray(frame), "RGB")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_features(videos, zip_path):
    zip_path.parent.mkdir(parents=True)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:
        for video in videos:
            if video.get("frames") is None:
                continue
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(video["frames"]), allow_pickle=False)
            zf.writestr(f"{video['id']}.npy", buf.getvalue())
