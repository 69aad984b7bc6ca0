"""The challenge's submission format: `id,category_id` lines, no header, one per video of the split."""
from collections import Counter

import numpy as np

from core.records import atomic_path


class SubmissionError(ValueError):
    pass


def check_ids(ids, store_ids, store_path):
    """Every video of the split's store (store_ids, read from store_path) exactly once, and nothing else."""
    counts = Counter(ids)
    dup = [v for v, n in counts.items() if n > 1]
    if dup:
        raise SubmissionError(f"{store_path}: video id {dup[0]} would be written {counts[dup[0]]} times")
    missing, extra = set(store_ids) - set(ids), set(ids) - set(store_ids)
    if missing or extra:
        which = f"missing {sorted(missing)[0]}" if missing else f"unknown {sorted(extra)[0]}"
        raise SubmissionError(f"{store_path}: predictions do not cover the split's videos exactly "
                              f"({len(missing)} missing, {len(extra)} unknown; e.g. {which})")


def write_predictions(path, ids, pred, fine_classes, reader):
    """Write `id,category_id` for videos `ids` (N,) with fine class indices `pred` (N,), atomically;
    `ids` must cover the split's store (an open StoreReader) exactly."""
    check_ids(list(ids), reader.ids, reader.path)
    classes = np.asarray(fine_classes)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        for video, cls in zip(ids, classes[np.asarray(pred)]):
            fh.write(f"{video},{cls}\n")


def read_predictions(path):
    """{id: category_id} from a submission file."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            parts = line.rstrip("\n").split(",")
            if len(parts) != 2:
                raise SubmissionError(f"{path}: line {line_no} is not 'id,category_id'")
            out[parts[0]] = parts[1]
    return out
