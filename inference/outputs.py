"""predict's outputs besides the submission: the k best classes per video and the whole probability matrix.

    OUT.topk.csv   id,rank,category_id,level1_id,probability   (header; k lines per video, best first)
    FILE.h5        ids (N,), fine_classes (C,), level1_ids (C,): each fine class's coarse class,
                   proba (N, C) float32: the stacker's probabilities, pred (N,): the label's class index

The probabilities are the stacker's own (what `stack` calibrated its long-tail reweighting, label shift and
decoding on); the label in the submission is decided from them by those, so it is usually, not always, the
class of rank 1.
"""
import csv

import h5py
import numpy as np

from core.records import atomic_path

TOP_K_FIELDS = ("id", "rank", "category_id", "level1_id", "probability")


def write_top_k(path, records):
    """Records (inference.predict.top_k_records) as CSV with a header, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TOP_K_FIELDS, lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow({**record, "probability": f"{record['probability']:.6g}"})


def write_proba(path, labelled, model_json):
    """The (N, C) probabilities with the ids and the class order, atomically."""
    fine, coarse = model_json["fine_classes"], model_json["coarse_classes"]
    strings = h5py.string_dtype()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        fh.create_dataset("ids", data=np.asarray(labelled.ids, dtype=object), dtype=strings)
        fh.create_dataset("fine_classes", data=np.asarray(fine, dtype=object), dtype=strings)
        fh.create_dataset("level1_ids", data=np.asarray([coarse[c] for c in model_json["fine_to_coarse"]],
                                                        dtype=object), dtype=strings)
        fh.create_dataset("proba", data=np.asarray(labelled.proba, np.float32))       # (N, C)
        fh.create_dataset("pred", data=np.asarray(labelled.pred, np.int64))            # (N,)
        fh.attrs["proba"] = "the stacker's probabilities, columns in fine_classes order"
        fh.attrs["pred"] = "the submission's label of each row, an index into fine_classes"
