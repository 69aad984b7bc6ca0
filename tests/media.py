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


# a three-class map in the challenge's format (two coarse classes)
MAP_CSV = "category_id,level1_id,level1_name,level2_name\n0000,00,a,a0\n0001,00,a,a1\n0100,01,b,b0\n"
CATS = ["0000", "0001", "0100"]


def make_jpeg_dataset(root, n=12, split="labeled", faults=True):
    """n videos as JPEG zips of 1-4 frames, labelled in MAP_CSV's classes; with faults, video 5's zip is
    missing, video 6 has a truncated extra JPEG and video 7 an empty zip."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "category_map.csv").write_text(MAP_CSV)
    videos = []
    for i in range(n):
        vid = f"v{i:03d}"
        videos.append({"id": vid, "title": f"title {i}", "asr": "spoken words" if i % 2 else "",
                       "ocr": [{"time": 2, "text": "later"}, {"time": 1, "text": "early"}],
                       "category_id": CATS[i % 3]})
        colours = [(20 * i % 255, 40 * k, 100) for k in range(1 + i % 4)]
        if faults and i == 5:
            continue                                              # missing zip
        extra = {"9.jpg": jpeg_bytes((0, 0, 0))[:50]} if faults and i == 6 else None
        write_jpeg_zip(root, split, vid, [] if faults and i == 7 else colours, extra)
    write_annotations(root, split, videos)
    return root


def make_npy_dataset(root, n, split="labeled", seed=0):
    """n videos in the feature-zip layout, 1-6 frames of dim 8, with a missing and a misshapen npy."""
    rng = np.random.default_rng(seed)
    arrays = {f"{split[0]}{i:03d}": rng.normal(size=(1 + i % 6, 8)).astype(np.float16) for i in range(n)}
    ids = list(arrays)
    arrays[ids[3]] = arrays[ids[3]][:, :5]                     # wrong shape: masked and reported
    del arrays[ids[7]]                                          # missing member
    write_feature_zip(root, split, arrays)
    write_annotations(root, split, [{"id": vid, "title": f"title {i}", "asr": "words" if i % 2 else "",
                                     "ocr": [{"time": 1, "text": f"ocr {i}"}], "category_id": CATS[i % 3]}
                                    for i, vid in enumerate(ids)])
    (root / "category_map.csv").write_text(MAP_CSV)
    return root


def extract_options(**changes):
    """ExtractOptions of the extract tests: 4 frames, 16 tokens, batches of 4, in this process, no aggregates."""
    from features.extract import ExtractOptions
    base = dict(frames=4, max_tokens=16, batch_size=4, workers=0, device="cpu", category_map=None, aggregates=None)
    return ExtractOptions(**dict(base, **changes))
