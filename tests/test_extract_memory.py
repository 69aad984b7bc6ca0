"""extract's CPU frame-encoder forwards all have one shape, so per-shape caches (oneDNN's convolution
primitives) stop growing after the first batch; the padding images never reach the store.

RSS itself is measured by `python -m bench extract --rss`, not here."""
import numpy as np
import torch

from features import encoders
from features.frames import open_source
from features.store import StoreReader
from features.extract import extract
from tests.media import extract_options as options, make_jpeg_dataset as make_dataset


def test_every_cpu_frame_forward_sees_the_same_number_of_images(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", n=12, faults=False)     # 1+2+3+4 frames a batch: chunks 3, 3, 3, 1
    sizes, real_encode = [], encoders.FrameEncoder.encode
    monkeypatch.setattr(encoders.FrameEncoder, "encode", lambda self, images: sizes.append(len(images))
                        or real_encode(self, images))
    extract(root, ["labeled"], tmp_path / "cache", options(frame_batch=3))
    assert len(sizes) > 3 and set(sizes) == {3}
    sizes.clear()
    extract(root, ["labeled"], tmp_path / "default", options())          # CPU default 32, capped at B x F
    assert sizes and set(sizes) == {4 * 4}


def test_padding_images_are_dropped_and_each_video_keeps_its_own_embeddings(tmp_path):
    root = make_dataset(tmp_path / "data", n=8, faults=False)
    extract(root, ["labeled"], tmp_path / "cache", options(frame_batch=3))
    store = StoreReader(tmp_path / "cache" / "labeled.h5")
    frame_emb, frame_mask = store.read("frame_emb", slice(None)), store.read("frame_mask", slice(None))
    encoder = encoders.build_frame_encoder("efficientnet-lite0", "cpu", "fp32")
    source = open_source("zip", root, "labeled", 4)
    for row, video_id in enumerate(store.ids):
        frames = source.load(video_id).frames
        alone = encoder.encode(torch.stack([encoder.preprocess(im) for im in frames])).float().numpy()  # (n, D)
        assert frame_mask[row].sum() == len(frames) and not frame_mask[row, len(frames):].any()
        np.testing.assert_allclose(frame_emb[row, : len(frames)].astype(np.float32), alone, atol=1e-2, rtol=1e-2)
        assert not frame_emb[row, len(frames):].any()
