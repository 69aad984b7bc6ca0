"""Tiny media in the challenge layouts: JPEG zips, feature zips, mp4 files."""
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(colour, size=32):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_jpeg_zip(data_dir, split, vid, colours, extra=None):
    path = Path(data_dir) / "zip_frames" / split / vid[-3:] / f"{vid}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for i, colour in enumerate(colours):
            zf.writestr(f"{i}.jpg", jpeg_bytes(colour))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def write_feature_zip(data_dir, split, arrays):
    """arrays: {id: ndarray}; written as <id>.npy members."""
    path = Path(data_dir) / "zip_feats" / f"{split}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for vid, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(f"{vid}.npy", buf.getvalue())
    return path


def write_annotations(data_dir, split, videos):
    path = Path(data_dir) / "annotations" / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(videos))
    return path


def write_mp4(path, n_frames, size=32):
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            img = np.full((size, size, 3), min(12 * i, 255), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
