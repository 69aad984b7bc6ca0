"""Cheap per-video signals for the stacker: how sure each base model is, and how much input a video had.

From the predictions: each model's top-1 margin (p1 - p2) and entropy. From the store, read in row
batches: the number of real frames, the characters of title / ocr / asr, and optionally the
low-dimensional agg/shift_stats.
"""
import numpy as np

from core import schema
from stacking.stackers import StackInput

SHIFT_STATS = f"{schema.AGG_GROUP}/shift_stats"


def prediction_signals(probas):
    """probas: list of M arrays (N, C) -> (signals (N, 2M), names)."""
    columns, names = [], []
    for m, proba in enumerate(probas):
        top2 = -np.partition(-proba, 1, axis=1)[:, :2]                 # (N, 2) two largest
        p = np.clip(proba, 1e-12, 1.0)
        columns += [top2[:, 0] - top2[:, 1], -(p * np.log(p)).sum(axis=1)]
        names += [f"margin_{m}", f"entropy_{m}"]
    return np.stack(columns, axis=1).astype(np.float32), names


def store_signal_names(reader, use_shift_stats):
    names = ["n_frames"] + [f"{f}_len" for f in schema.TEXT_FIELDS]
    if use_shift_stats and SHIFT_STATS in reader.names:
        width = reader.h5[SHIFT_STATS].shape[1]
        names += [f"shift_stats_{i}" for i in range(width)]
    return names


def store_signals(reader, rows, names, batch_size=4096):
    """Signals `names` (from store_signal_names) of rows `rows` (N,) of the open store -> (N, S) float32.

    The store is read in contiguous row batches; only the small datasets are touched.
    """
    want_shift = any(n.startswith("shift_stats_") for n in names)
    if want_shift:
        reader.require(SHIFT_STATS, "python run.py extract (aggregates)")
    out = np.zeros((reader.n, len(names)), np.float32)                  # (N_store, S)
    for start in range(0, reader.n, batch_size):
        rows_b = slice(start, min(start + batch_size, reader.n))
        parts = [reader.read(schema.FRAME_MASK, rows_b).sum(axis=1, keepdims=True),
                 reader.read(schema.TEXT_LEN, rows_b)]
        if want_shift:
            parts.append(reader.read(SHIFT_STATS, rows_b).astype(np.float32))
        out[rows_b] = np.concatenate(parts, axis=1)
    return out[np.asarray(rows)]


def build_input(models, probas, reader, rows, signal_names):
    """StackInput from {model: (N, C)} probabilities of the videos at rows `rows` (N,) of the open store.

    rows: features.store.rows_of(reader.ids, ids, reader.path), which the caller has anyway to write
    the predictions, so the store is opened and its ids read once per split.
    """
    stacked = np.stack([probas[m] for m in models])                              # (M, N, C)
    pred_sig, _ = prediction_signals(list(stacked))
    store_names = [n for n in signal_names if not n.startswith(("margin_", "entropy_"))]
    return StackInput(stacked, np.concatenate([pred_sig, store_signals(reader, rows, store_names)], axis=1))


def signal_names_for(reader, n_models, n_classes, use_shift_stats):
    """Names of the signals build_input makes for n_models models over the open store `reader`."""
    _, pred_names = prediction_signals([np.full((1, n_classes), 1.0 / n_classes)] * n_models)
    return pred_names + store_signal_names(reader, use_shift_stats)
