"""Batches of rows read lazily from a feature store, for training and prediction (which datasets a
model reads is its registry entry: neural/models/__init__.py, model_inputs).

An item of `StoreBatches` is a whole batch: a sorted array of row indices, read with one h5py fancy
index per dataset (h5py needs increasing indices), so a split is never loaded whole. Padded axes
(text tokens, frames) are trimmed to the longest real sequence in the batch.
"""
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core import schema

AGG_COMMAND = "python run.py extract"      # the aggregates stage of extract writes agg/*

MLP_AGGREGATES = ("agg/first_frame", "agg/shift_stats")    # required; plus every agg/<pooling> (N, width)


def agg_names(reader):
    """The (N, width) aggregate datasets a model that reads aggregates (mlp) takes: first frame, shift
    statistics, each pooling; a store without them raises StoreError naming the command."""
    vectors = sorted(n for n in reader.names if n.startswith(schema.AGG_GROUP + "/")
                     and len(reader.h5[n].shape) == 2)
    for name in MLP_AGGREGATES:
        reader.require(name, AGG_COMMAND)
    return vectors


def _trim(batch, values_key, mask_key, limit=None):
    """Cut a padded axis to its longest real sequence (at least 1), for speed."""
    if mask_key not in batch:
        return
    mask = batch[mask_key]                                   # (B, L) bool
    real = np.flatnonzero(mask.any(axis=0))
    length = max(int(real[-1]) + 1 if len(real) else 1, 1)
    if limit:
        length = min(length, limit)
    batch[mask_key] = mask[:, :length]
    batch[values_key] = batch[values_key][:, :length]


class StoreBatches(Dataset):
    """dataset[rows] -> {name: tensor (B, ...)} plus "rows" (B,) and, when labels are given, "label_fine"
    and "label_coarse" (B,); rows are returned sorted."""

    def __init__(self, reader, names, labels=None, fine_to_coarse=None, max_tokens=None):
        self.reader, self.names, self.max_tokens = reader, list(names), max_tokens
        self.labels = None if labels is None else np.asarray(labels, np.int64)        # (N,)
        self.fine_to_coarse = None if fine_to_coarse is None else np.asarray(fine_to_coarse, np.int64)

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, rows):
        rows = np.sort(np.asarray(rows))
        index = slice(int(rows[0]), int(rows[-1]) + 1) if rows[-1] - rows[0] + 1 == len(rows) else rows
        batch = {name: self.reader.read(name, index) for name in self.names}
        _trim(batch, schema.TEXT_TOKENS, schema.TEXT_TOKEN_MASK, self.max_tokens)
        _trim(batch, schema.FRAME_EMB, schema.FRAME_MASK)
        out = {name: torch.from_numpy(np.ascontiguousarray(value, np.float32 if value.dtype != bool else bool))
               for name, value in batch.items()}
        out["rows"] = torch.from_numpy(rows.astype(np.int64))
        if self.labels is not None:
            fine = self.labels[rows]
            out["label_fine"] = torch.from_numpy(fine)
            out["label_coarse"] = torch.from_numpy(self.fine_to_coarse[fine])
        return out


def shuffled_batches(rows, batch_size, seed):
    """Row batches in a seeded random order (one epoch); deterministic for a given seed."""
    order = np.random.default_rng(seed).permutation(np.asarray(rows))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def ordered_batches(rows, batch_size):
    rows = np.sort(np.asarray(rows))
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def loader(dataset, batches, num_workers=0):
    """A DataLoader whose every item is one pre-built batch of rows."""
    return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=num_workers,
                      persistent_workers=False)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
