"""The Python API: a model directory -> a Classifier that labels videos given in memory.

    from inference.api import load_model
    clf = load_model("STACK/model")                # or Classifier.load(...); a STACK_DIR holding model/ works too
    videos = [{"id": "v1", "title": "...", "asr": "...", "ocr": "...", "frames": ["0.jpg", "1.jpg"]}]
    clf.predict(videos)                            # ["0201"]: fine classes (category_id)
    clf.predict_proba(videos, top_k=3)             # id, rank, category_id, level1_id, probability

Frames: image files, decoded (H, W, 3) uint8 arrays, a video file or (F, D) frame features, whichever the
model was trained on (inference/videos.py). Each call goes through `predict`'s own path: the records are
written in the challenge layout to a temporary directory, extracted with the model's recorded encoders and
options, then the codebook's aggregates, the fold models, the stacker and the decision
(inference.predict.label_split); the directory is deleted when the call returns. So the labels are
`python run.py predict`'s on the same videos; as there, the split-level steps (label shift, decoding) see
the videos of one call together. The encoders load once per Classifier, at its first call.
"""
import tempfile
import warnings
from pathlib import Path

from inference.model_dir import open_model_dir
from inference.predict import (Controls, check_encoders, choose_precision, choose_runtime, extract_options,
                               label_split, resolve_model_dir, top_k_records)
from inference.videos import check_videos, write_dataset

SPLIT = "videos"          # the temporary split's name


def load_model(model_dir, **controls):
    """A Classifier for MODEL_DIR (or STACK_DIR/model); controls as Classifier's."""
    return Classifier.load(model_dir, **controls)


class Classifier:
    """Labels videos given in memory with a model directory (inference/package.py).

    device: auto | cpu | cuda; threads: torch CPU threads (0: torch's default); batch_size: videos per
    encoder batch; workers: processes decoding frames (0: in this process); precision: the model's own
    (another is refused); runtime: the encoders' runtime (default: the recorded one)."""

    def __init__(self, model, device="auto", threads=0, batch_size=32, workers=0, precision=None, runtime=None):
        self.model = model
        self.model.runtime = choose_runtime(model.model_json, runtime)
        self.controls = Controls(device=device, threads=threads, batch_size=batch_size, workers=workers,
                                 precision=choose_precision(model.model_json, precision))
        self.text_encoder = self.frame_encoder = None           # built at the first call, then kept

    @classmethod
    def load(cls, model_dir, **controls):
        """The model directory checked against its manifest (a file missing or altered is refused)."""
        return cls(open_model_dir(resolve_model_dir(model_dir)), **controls)

    @property
    def classes_(self):
        """The fine classes (category_id), in the order of predict_proba's columns."""
        return list(self.model.model_json["fine_classes"])

    def predict(self, videos):
        """The fine class (category_id) of each video, in the records' order."""
        labelled = self.label(videos)
        return [self.classes_[c] for c in labelled.pred]

    def predict_proba(self, videos, top_k=5, as_frame=None):
        """The top_k most probable fine classes of each video with their coarse class and the stacker's
        probability, best first: a pandas DataFrame (as_frame None and pandas importable, or True) or a list
        of records with id, rank, category_id, level1_id, probability."""
        if int(top_k) < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        records = top_k_records(self.label(videos), self.model.model_json, top_k)
        if as_frame is False:
            return records
        try:
            import pandas as pd
        except ImportError:
            if as_frame:
                raise ImportError("predict_proba(as_frame=True) needs pandas: pip install "
                                  "'shortvideo-classifier[pandas]'") from None
            return records
        return pd.DataFrame.from_records(records, columns=["id", "rank", "category_id", "level1_id", "probability"])

    def label(self, videos):
        """Labelled: ids (N,), the stacker's probabilities (N, C) in classes_ order, labels (N,) as indices."""
        videos = list(videos) if not isinstance(videos, dict) else videos
        layout = check_videos(videos, self.model.model_json["store_identity"]["frame_encoder"])
        with tempfile.TemporaryDirectory(prefix="shortvideo-") as tmp:
            data, cache = Path(tmp) / "data", Path(tmp) / "cache"
            write_dataset(videos, data, SPLIT, layout)
            cache.mkdir()
            self._extract(data, cache, layout)
            labelled = label_split(self.model, cache, SPLIT, self.controls.device)
        return labelled

    def _extract(self, data_dir, cache_dir, layout):
        """`predict`'s extract of the temporary split (features/extract.py extract_split) with this object's
        encoders; the media faults (masked frames) are warned about, as `predict` reports them."""
        from features.categories import load_category_map
        from features.extract import extract_split
        options = extract_options(self.model, layout, self.controls)
        device = self._device(options)
        text_encoder, frame_encoder = self.encoders(options, device, need_frames=layout != "npy")
        report = extract_split(data_dir, SPLIT, cache_dir, options, layout, load_category_map(options.category_map),
                               frame_encoder, text_encoder, device, lambda config: check_encoders(config, self.model))
        if report["n_videos_with_faults"]:
            shown = "; ".join(f"{f['id']}: {f['kind']}" for f in report["faults"][:5])
            warnings.warn(f"{report['n_videos_with_faults']} of {report['n_videos']} videos had frames that could "
                          f"not be used (masked; labelled from the rest): {shown}", stacklevel=3)

    def _device(self, options):
        import torch
        from core.device import resolve_device
        device = resolve_device(options.device)
        if device == "cpu" and options.threads:
            torch.set_num_threads(options.threads)
        return device

    def encoders(self, options, device, need_frames=True):
        """(text encoder, frame encoder or None): built as `extract` builds them, at the first call only."""
        from core.device import resolve_precision
        from features.encoders import build_frame_encoder, build_text_encoder
        precision = resolve_precision(options.precision, device)
        if self.text_encoder is None:
            self.text_encoder = build_text_encoder(options.text_encoder, device, precision, options.runtime)
        if need_frames and self.frame_encoder is None:
            self.frame_encoder = build_frame_encoder(options.frame_encoder, device, precision,
                                                     self.text_encoder.runtime)
        return self.text_encoder, self.frame_encoder if need_frames else None
