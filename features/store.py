"""The HDF5 feature store: create, resume, write rows, mark complete, and read lazily.

The layout is in core/schema.py. Crash safety comes from the layout never changing after
creation: every dataset is allocated in full when the store is made (HDF5 early allocation), so a
later write only touches raw chunk bytes, never the file's metadata; a row's `done` flag is written
and flushed only after its data, and `complete` is set only once every row is done.
"""
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from core import schema
from core.hdf5 import create_dataset
from core.records import atomic_path, options_diff
from features.runtime import comparable_config


class StoreError(RuntimeError):
    """A store that cannot be used as asked (wrong config, incomplete, missing dataset)."""


class StoreMismatch(StoreError):
    """An existing store made for other videos, inputs, encoders or options than a run now asks for.
    `reason` says what differs; the advice after it is extract's (a caller with other options gives its own)."""

    def __init__(self, reason, advice="use --overwrite to rebuild it"):
        super().__init__(f"{reason}; {advice}")
        self.reason = reason


@dataclass
class StoreDims:
    n_frames: int      # F
    frame_dim: int     # D
    text_dim: int      # Dt
    n_tokens: int      # T


def _video_datasets(n, dims):
    """(name, shape, dtype) of every per-video dataset written by `extract`."""
    f, t, nf = dims.n_frames, dims.n_tokens, len(schema.TEXT_FIELDS)
    return [
        (schema.FRAME_EMB, (n, f, dims.frame_dim), "f2"),
        (schema.FRAME_MASK, (n, f), "bool"),
        (schema.TEXT_POOLED, (n, nf, dims.text_dim), "f2"),
        (schema.TEXT_FIELD_MASK, (n, nf), "bool"),
        (schema.TEXT_LEN, (n, nf), "int32"),
        (schema.TEXT_TOKENS, (n, t, dims.text_dim), "f2"),
        (schema.TEXT_TOKEN_MASK, (n, t), "bool"),
        (schema.DONE, (n,), "bool"),
    ]


def config_json(config):
    return json.dumps(config, sort_keys=True)


NOT_FEATURES = ("frames_from", "limit")     # extract options saying where frames came from and how many videos


def feature_identity(config):
    """A store's config less the options that do not change its features (NOT_FEATURES): two stores whose
    feature identities are equal hold comparable embeddings (same encoders, weights, options, precision, map;
    runtimes whose features are interchangeable, torch and onnx in fp32 say, compare equal: features/runtime.py)."""
    options = {k: v for k, v in config.get("options", {}).items() if k not in NOT_FEATURES}
    return comparable_config({**config, "options": options})


def create_store(path, split, ids, label_fine, label_coarse, dims, config, category_map, environment=None,
                 inputs=None):
    """Make a new, empty store at `path` (written to `path.tmp` first, then renamed into place). `inputs`:
    the identity of what it is made from (features/inputs.py), compared when it is resumed or reused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset(schema.IDS, data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset(schema.LABEL_FINE, data=np.asarray(label_fine, np.int32))
        h5.create_dataset(schema.LABEL_COARSE, data=np.asarray(label_coarse, np.int32))
        for name, shape, dtype in _video_datasets(n, dims):
            create_dataset(h5, name, shape, dtype)
        h5.attrs["schema_version"] = schema.SCHEMA_VERSION
        h5.attrs["split"] = split
        h5.attrs["complete"] = False
        h5.attrs["config"] = config_json(config)
        h5.attrs["environment"] = json.dumps(environment or {})   # package versions; not compared
        if inputs is not None:
            h5.attrs["inputs"] = json.dumps(inputs, sort_keys=True)
        h5.attrs["fine_classes"] = np.array(category_map.fine_ids, dtype=h5py.string_dtype())
        h5.attrs["coarse_classes"] = np.array(category_map.coarse_ids, dtype=h5py.string_dtype())
        h5.attrs["fine_to_coarse"] = np.asarray(category_map.fine_to_coarse, np.int32)


def check_inputs(path, inputs):
    """Refuse to resume or reuse a store made from other inputs (annotations or media changed since); a store
    that records none (made before stores recorded them) is not refused."""
    with h5py.File(path, "r") as h5:
        stored = h5.attrs.get("inputs")
    if stored is not None and inputs is not None and json.loads(stored) != inputs:
        raise StoreMismatch(f"{path}: made from other inputs than the split holds now: its videos changed since "
                            f"({options_diff(json.loads(stored), inputs)})")


def is_store(path):
    """True when `path` is a feature store (an HDF5 file with the store's schema_version), not another file."""
    try:
        with h5py.File(path, "r") as h5:
            return "schema_version" in h5.attrs and schema.IDS in h5
    except OSError:
        return False


def check_config(path, config):
    """Refuse to resume into a store made with other encoders or options (a runtime interchangeable with the
    store's, features/runtime.py, is not another option: its rows agree below the store's float16 rounding)."""
    with h5py.File(path, "r") as h5:
        stored = h5.attrs.get("config")
        version = h5.attrs.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise StoreMismatch(f"{path}: schema version {version}, this code writes {schema.SCHEMA_VERSION}")
    if comparable_config(json.loads(stored)) != comparable_config(json.loads(config_json(config))):
        diff = options_diff(comparable_config(json.loads(stored)), comparable_config(config))
        raise StoreMismatch(f"{path} was made with other encoders or options ({diff})",
                            "use --overwrite to rebuild it or --out for a new cache directory")


class StoreWriter:
    """Writes rows into an existing store, for one process at a time."""

    def __init__(self, path):
        self.path = Path(path)
        self.h5 = h5py.File(self.path, "r+")

    def done_rows(self):
        return self.h5[schema.DONE][:]          # (N,) bool

    def write_rows(self, start, arrays):
        """Write `arrays` ({dataset name: (B, ...)}) at rows start..start+B, then mark them done."""
        b = None
        for name, values in arrays.items():
            b = len(values)
            self.h5[name][start:start + b] = values
        self.h5.flush()
        self.h5[schema.DONE][start:start + b] = True
        self.h5.flush()

    def mark_complete(self):
        if not self.h5[schema.DONE][:].all():
            raise StoreError(f"{self.path}: not every row is done")
        self.h5.attrs["complete"] = True
        self.h5.flush()

    def close(self):
        self.h5.close()


# HDF5's metadata cache (per open file) keeps the chunk-index B-tree nodes of every row chunk read and by
# default grows with them up to 32 MiB of their on-disk size, ~7x that in memory (272-byte native keys):
# reading a 30k-video store at random grew a process by 44 MiB, ~1.5 KB per video, up to ~240 MiB per
# handle. Held at HDF5's default initial size instead, it stays flat in N (+15 MiB at 10k and 30k) for
# ~0.1 ms more per row.
METADATA_CACHE_BYTES = 2 * 2**20


def bound_metadata_cache(h5, max_bytes=METADATA_CACHE_BYTES):
    """Keep an open h5py.File's metadata cache at most `max_bytes` (of on-disk size), whatever it reads."""
    config = h5.id.get_mdc_config()
    config.set_initial_size, config.initial_size = True, max_bytes
    config.max_size, config.min_size = max_bytes, min(config.min_size, max_bytes // 2)
    h5.id.set_mdc_config(config)


def is_complete(path):
    with h5py.File(path, "r") as h5:
        return bool(h5.attrs.get("complete", False))


class StoreReader:
    """Lazy reader: opens the file on first use in each process (one handle per DataLoader worker)."""

    def __init__(self, path, require_complete=True):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path}: no feature store here; run `python run.py extract` first")
        self._h5, self._pid = None, None
        with h5py.File(self.path, "r") as h5:
            self.attrs = dict(h5.attrs)
            self.n = len(h5[schema.IDS])
            self.names = set()
            h5.visititems(lambda name, obj: self.names.add(name) if isinstance(obj, h5py.Dataset) else None)
        if require_complete and not self.attrs.get("complete", False):
            raise StoreError(f"{self.path}: store is incomplete (an extract was interrupted); "
                             "run `python run.py extract` again to finish it")

    @property
    def h5(self):
        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
            bound_metadata_cache(self._h5)          # every handle, in every process, reads with the cap
        return self._h5

    def __len__(self):
        return self.n

    def __getstate__(self):          # a DataLoader worker reopens its own handle
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, None
        return state

    def require(self, name, command="python run.py extract"):
        if name not in self.names:
            raise StoreError(f"{self.path}: dataset '{name}' is missing; run `{command}` to produce it")

    def read(self, name, rows):
        """Rows of one dataset; `rows` a slice or an array of indices (any order, repeats allowed)."""
        self.require(name)
        dataset = self.h5[name]
        if isinstance(rows, slice):
            return dataset[rows]
        rows = np.asarray(rows, np.int64)
        # h5py's fancy indexing builds a point selection row by row: ~10-50x slower than these
        if _whole_row_chunks(dataset):
            return _read_row_chunks(dataset, rows)
        return _read_runs(dataset, rows)

    @functools.cached_property
    def ids(self):
        """(N,) str video ids, read once per reader."""
        return np.array(self.h5[schema.IDS].asstr()[:], dtype=str)          # (N,) str

    @property
    def config(self):
        return json.loads(self.attrs["config"])

    @property
    def inputs(self):
        """What the store was made from (features/inputs.py), or None for a store made before it was recorded."""
        return json.loads(self.attrs["inputs"]) if "inputs" in self.attrs else None

    @property
    def fine_classes(self):
        return [str(c) for c in self.attrs["fine_classes"]]

    @property
    def coarse_classes(self):
        return [str(c) for c in self.attrs["coarse_classes"]]

    @property
    def fine_to_coarse(self):
        return np.asarray(self.attrs["fine_to_coarse"], np.int64)

    def close(self):
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rows_of(store_ids, ids, path):
    """(len(ids),) int64 row of each of `ids` in a store whose ids are `store_ids`; refuses ids it lacks."""
    index = {v: i for i, v in enumerate(store_ids)}
    missing = [v for v in ids if v not in index]
    if missing:
        raise StoreError(f"{path}: video id(s) {', '.join(missing[:5])} (of {len(missing)}) are not in the "
                         "store; the run was made from a different store")
    return np.array([index[v] for v in ids], np.int64)


def _whole_row_chunks(dataset):
    """True when each row is one unfiltered chunk, so it can be read as raw chunk bytes."""
    return (dataset.ndim > 1 and dataset.chunks == (1,) + dataset.shape[1:]
            and dataset.id.get_create_plist().get_nfilters() == 0)


def _read_row_chunks(dataset, rows):
    """dataset[rows] from the raw bytes of each row's chunk."""
    shape, origin = dataset.shape[1:], (0,) * (dataset.ndim - 1)
    out = np.empty((len(rows),) + shape, dataset.dtype)
    for j, i in enumerate(rows):
        _, raw = dataset.id.read_direct_chunk((int(i),) + origin)
        out[j] = np.frombuffer(raw, dataset.dtype).reshape(shape)
    return out


def _read_runs(dataset, rows):
    """dataset[rows] read as contiguous runs of sorted rows (1-D datasets: chunks span many rows)."""
    order = np.argsort(rows, kind="stable")
    ranked = rows[order]
    breaks = np.flatnonzero(np.diff(ranked) != 1) + 1
    runs = [dataset[run[0]:run[-1] + 1] for run in np.split(ranked, breaks) if len(run)]
    out = np.empty((len(rows),) + dataset.shape[1:], dataset.dtype)
    out[order] = np.concatenate(runs) if runs else out[:0]
    return out
