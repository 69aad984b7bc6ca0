"""Frame sources: JPEG zips per video, one zip of pre-extracted .npy features per split, or video files.

Each source is picklable (it runs inside DataLoader workers, opening its files lazily there) and
`load(video_id)` returns up to `n_frames` frames sampled uniformly in time. A fault of the media of
one video raises MediaFault; the caller masks that video's frames and reports it.
"""
import io
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".flv", ".m4v")


FLOAT16_MAX = 65504.0
LAYOUTS = {"npy": "zip_feats/{split}.zip", "zip": "zip_frames/{split}", "video": "videos/{split}"}


class FrameSourceError(ValueError):
    """A split's frames cannot be found or read as a whole (no layout, several layouts, no readable member)."""


# what reading one zip member can raise besides OSError: a damaged archive or compressed stream, a
# compression method or an encryption zipfile cannot read (NotImplementedError, RuntimeError), a short file
ZIP_MEMBER_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


class MediaFault(Exception):
    """The media of one video cannot be used; `file`, `reason` and `kind` go into the extract report.

    kind: a short fixed phrase (the report's fault_counts key), the reason itself when it has no details."""

    def __init__(self, file, reason, kind=None):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason, self.kind = str(file), reason, kind or reason


@dataclass
class LoadedFrames:
    frames: object                     # list of PIL images, or (n, D) float16 array of features
    file: str
    faults: list = field(default_factory=list)   # MediaFault per frame lost while other frames were usable


def uniform_indices(n_available, n_frames):
    """Up to n_frames indices spread evenly over 0..n_available-1, in time order."""
    if n_available <= n_frames:
        return np.arange(n_available)
    return np.unique(np.linspace(0, n_available - 1, n_frames).round().astype(int))


def _frame_number(name):
    stem = Path(name).stem
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


class JpegZipFrames:
    """DATA/zip_frames/<split>/<id[-3:]>/<id>.zip, one JPEG a frame (final-round layout)."""
    kind = "images"

    def __init__(self, data_dir, split, n_frames):
        self.root = Path(data_dir) / "zip_frames" / split
        self.n_frames = n_frames

    def path(self, video_id):
        return self.root / _name(video_id)[-3:] / f"{video_id}.zip"

    def load(self, video_id):
        path = self.path(video_id)
        if not path.exists():
            raise MediaFault(path, "missing zip")
        try:
            with zipfile.ZipFile(path) as zf:
                names = sorted((n for n in zf.namelist() if not n.endswith("/")), key=_frame_number)
                if not names:
                    raise MediaFault(path, "zero frames")
                chosen = [names[i] for i in uniform_indices(len(names), self.n_frames)]
                frames, faults = [], []
                for name in chosen:
                    try:
                        frames.append(_decode_jpeg(zf.read(name)))
                    except (ValueError, Image.DecompressionBombError, *ZIP_MEMBER_ERRORS) as err:
                        faults.append(MediaFault(path, f"corrupt JPEG {name}: {_image_error(err)}", "corrupt JPEG"))
        except (ValueError, *ZIP_MEMBER_ERRORS) as err:
            raise MediaFault(path, f"unreadable zip: {err}", "unreadable zip") from err
        if not frames:
            raise MediaFault(path, "no decodable frame (" + "; ".join(f.reason for f in faults) + ")",
                             "no decodable frame")
        return LoadedFrames(frames, str(path), faults)


def _name(video_id):
    """The id itself; one that is a path (features.annotations refuses those where ids enter) never
    reaches a file name."""
    from features.annotations import id_problem
    problem = id_problem(video_id) if video_id else "it is empty"
    if problem:
        raise MediaFault(repr(video_id), f"video id is not a name: {problem}", "video id is not a name")
    return video_id


def _decode_jpeg(data):
    image = Image.open(io.BytesIO(data))
    image.load()                      # decode now, so a truncated file fails here
    return image.convert("RGB")


def _image_error(err):
    """A decoding error for people: PIL names an unknown format by the in-memory buffer's repr."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image (no JPEG or other known image header)"
    if isinstance(err, Image.DecompressionBombError):
        return "image too large to decode safely"
    return str(err) or type(err).__name__


class NpyZipFrames:
    """DATA/zip_feats/<split>.zip holding <id>.npy float16 [n_frames, D] (preliminary layout)."""
    kind = "features"

    def __init__(self, data_dir, split, n_frames, dim=None):
        self.path = Path(data_dir) / "zip_feats" / f"{split}.zip"
        self.n_frames, self.dim = n_frames, dim
        self._zip, self._pid, self._members = None, None, None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"], state["_pid"] = None, None
        return state

    def _open(self):
        if self._zip is None or self._pid != os.getpid():
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: feature zip not found")
            try:
                zf = zipfile.ZipFile(self.path)
            except (ValueError, *ZIP_MEMBER_ERRORS) as err:
                raise FrameSourceError(f"{self.path}: not a readable zip of <id>.npy members: {err}") from err
            self._members = _npy_members(self.path, zf.namelist())
            self._zip, self._pid = zf, os.getpid()
        return self._zip

    def probe_dim(self):
        """D of the first usable member, so the store can be sized before extraction."""
        zf = self._open()
        for video_id, name in list(self._members.items())[:100]:
            try:
                return int(_check_features(video_id, _read_npy(zf, name, video_id), None).shape[1])
            except MediaFault:
                continue
        raise FrameSourceError(f"{self.path}: no readable [n_frames, D] float .npy member among the first 100")

    def load(self, video_id):
        zf = self._open()
        where = f"{self.path}:{video_id}.npy"
        if video_id not in self._members:
            raise MediaFault(where, "missing npy member")
        arr = _read_npy(zf, self._members[video_id], where)
        arr = _check_features(where, arr, self.dim)                   # (n, D) float16
        return LoadedFrames(arr[uniform_indices(len(arr), self.n_frames)], where)


def _npy_members(path, names):
    """{video id: member name} of the zip's .npy members (any folder inside the zip); refuses an id
    that two members would give, which one was meant cannot be told."""
    members = {}
    for name in names:
        if name.endswith(".npy"):
            video_id = name.rsplit("/", 1)[-1][: -len(".npy")]
            if video_id in members:
                raise FrameSourceError(f"{path}: members {members[video_id]!r} and {name!r} are both the "
                                       f"features of video {video_id!r}")
            members[video_id] = name
    return members


def _read_npy(zf, name, where):
    """The array of one .npy member; never a pickle, never an .npz, never a guess at a short file."""
    try:
        return np.lib.format.read_array(io.BytesIO(zf.read(name)), allow_pickle=False)
    except (ValueError, MemoryError, *ZIP_MEMBER_ERRORS) as err:
        raise MediaFault(where, f"unreadable npy: {str(err) or type(err).__name__}", "unreadable npy") from err


def _check_features(where, arr, dim):
    """(n, D) features as float16: float32/float64 are cast, refusing values float16 cannot hold."""
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim) or arr.shape[1] == 0:
        raise MediaFault(where, f"shape {arr.shape}, expected [n_frames, {dim or 'D > 0'}]", "wrong shape")
    if arr.shape[0] == 0:
        raise MediaFault(where, "zero frames")
    if arr.dtype not in (np.float16, np.float32, np.float64):
        raise MediaFault(where, f"dtype {arr.dtype}, expected float16 (or float32/float64 within its range)",
                         "wrong dtype")
    if not np.isfinite(arr).all():
        raise MediaFault(where, "NaN or inf values")
    peak = float(np.abs(arr).max())
    if peak > FLOAT16_MAX:
        raise MediaFault(where, f"float16 overflow: |x| up to {peak:.6g} in {arr.dtype}, float16 holds "
                                f"at most {FLOAT16_MAX:.0f}", "float16 overflow")
    return arr.astype(np.float16, copy=False)


class VideoFileFrames:
    """DATA/videos/<split>/<id>.<mp4|mkv|...>, decoded with PyAV."""
    kind = "images"

    def __init__(self, data_dir, split, n_frames):
        self.root = Path(data_dir) / "videos" / split
        self.n_frames = n_frames

    def path(self, video_id):
        for suffix in VIDEO_SUFFIXES:
            candidate = self.root / f"{_name(video_id)}{suffix}"
            if candidate.exists():
                return candidate
        return None

    def load(self, video_id):
        import av
        path = self.path(video_id)
        if path is None:
            raise MediaFault(self.root / f"{video_id}.*", "missing video file")
        try:
            n_available = _count_frames(av, path)
            if n_available == 0:
                raise MediaFault(path, "zero frames")
            wanted = set(uniform_indices(n_available, self.n_frames).tolist())
            with av.open(str(path)) as container:   # keep only the sampled frames in memory
                frames = [f.to_image() for i, f in enumerate(container.decode(video=0)) if i in wanted]
        except (av.error.FFmpegError, OSError, ValueError, IndexError) as err:
            raise MediaFault(path, f"undecodable video: {err}", "undecodable video") from err
        if not frames:
            raise MediaFault(path, "zero frames")
        return LoadedFrames(frames, str(path))


def _count_frames(av, path):
    """Frames in the first video stream; containers that do not say are counted by demuxing."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return stream.frames
        return sum(1 for packet in container.demux(stream) if packet.size)


SOURCES = {"zip": JpegZipFrames, "npy": NpyZipFrames, "video": VideoFileFrames}


def detect_source(data_dir, split):
    """Which layout DATA holds for this split: 'npy', 'zip' or 'video'."""
    data_dir = Path(data_dir)
    found = [kind for kind, where in LAYOUTS.items() if (data_dir / where.format(split=split)).exists()]
    if not found:
        raise FileNotFoundError(
            f"{data_dir}: no frames for split '{split}': expected zip_feats/{split}.zip, "
            f"zip_frames/{split}/ or videos/{split}/")
    if len(found) > 1:
        raise FrameSourceError(f"{data_dir}: split '{split}' has frames in several layouts "
                               f"({', '.join(found)}); choose one with --frames-from")
    return found[0]


def check_source(data_dir, split, kind):
    """Refuse a layout asked for by name (--frames-from) whose file or folder is absent."""
    where = Path(data_dir) / LAYOUTS[kind].format(split=split)
    if not where.exists():
        raise FileNotFoundError(f"{where}: no frames for split '{split}' in the '{kind}' layout (--frames-from)")
    return kind


def open_source(kind, data_dir, split, n_frames):
    return SOURCES[kind](data_dir, split, n_frames)
