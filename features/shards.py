"""One split cut into shards for many ranks: a fixed plan of row ranges, one store per shard, then one store.

Under torchrun each rank extracts whole shards (a contiguous range of them, `World.share`) into stores of
today's format, so no two processes ever write one HDF5 file. The plan is made once, at the first run,
from the number of rows and a unit (the extract batch size, or its lcm with the aggregates' batch size),
never from the world size, and recorded in CACHE/<split>.shards/plan.json: a rerun with any number of
ranks keeps the finished shards and continues an unfinished one from its done flags. Shard boundaries
fall on multiples of the unit, so every batch is the batch a one-process run would have made and the
stitched store equals the one-process store bit for bit.

Stitching copies the shards' rows into CACHE/<split>.h5 (written as <split>.h5.tmp, renamed at the end),
after checking that every shard exists and is complete. A copy rather than an h5py Virtual Dataset:
the stitched store stays one self-contained file whose rows are single chunks, so readers keep their
raw-chunk reads (a virtual dataset has no chunks of its own) and a deleted shard can never read back
as fill values; its cost is one sequential pass (`python -m bench distributed_extract stitch` measures both).

    CACHE/<split>.shards/plan.json                 {"n_rows", "shard_rows", "unit"}
    CACHE/<split>.shards/<split>-00003.h5          rows [3 * shard_rows, 4 * shard_rows) of the split
    CACHE/<split>.shards/<split>-00003.faults.jsonl, .tokens.jsonl   (merged into <split>.* at stitching)
"""
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from core import schema
from core.hdf5 import create_dataset
from core.records import atomic_path, read_json, write_json
from features.store import StoreError

TARGET_SHARDS = 128          # shards per split at most (beyond, shards grow): 1.1M rows -> ~8.7k per shard
ROW_BLOCK = 1024             # rows copied per read/write while stitching
PLAN_FILE = "plan.json"


class ShardError(StoreError):
    """A shard plan or a shard that cannot be used (other rows, missing, incomplete)."""


@dataclass(frozen=True)
class ShardPlan:
    n_rows: int          # N: rows of the split
    shard_rows: int      # rows per shard (the last may have fewer); a multiple of `unit`
    unit: int            # batch boundaries the shards respect

    @property
    def bounds(self):
        """[(start, end)] of every shard, in row order."""
        return [(s, min(s + self.shard_rows, self.n_rows)) for s in range(0, self.n_rows, self.shard_rows)]


def plan_shards(n_rows, unit):
    """The plan for n_rows rows: shards of a multiple of `unit` rows, at most TARGET_SHARDS of them."""
    return ShardPlan(n_rows, unit * max(1, math.ceil(n_rows / (unit * TARGET_SHARDS))), unit)


def shard_dir(cache_dir, split):
    return Path(cache_dir) / f"{split}.shards"


def shard_path(cache_dir, split, index):
    return shard_dir(cache_dir, split) / f"{split}-{index:05d}.h5"


def shard_paths(cache_dir, split, plan):
    return [shard_path(cache_dir, split, i) for i in range(len(plan.bounds))]


def load_or_make_plan(cache_dir, split, n_rows, unit):
    """The recorded plan of a split (refused when it is for another number of rows), or a new one, recorded."""
    path = shard_dir(cache_dir, split) / PLAN_FILE
    if path.exists():
        plan = ShardPlan(**read_json(path, error=ShardError))
        if plan.n_rows != n_rows:
            raise ShardError(f"{path}: the shards were planned for {plan.n_rows} videos, the annotations now "
                             f"list {n_rows}; use --overwrite to rebuild them")
        return plan
    plan = plan_shards(n_rows, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"n_rows": plan.n_rows, "shard_rows": plan.shard_rows, "unit": plan.unit})
    return plan


def remove_shards(cache_dir, split):
    shutil.rmtree(shard_dir(cache_dir, split), ignore_errors=True)


def check_shards_complete(paths, aggregates):
    """Refuse, naming them, shards that are missing or not complete (frames, and agg/* when `aggregates`)."""
    problems = []
    for path in paths:
        if not Path(path).exists():
            problems.append(f"{path}: missing")
            continue
        with h5py.File(path, "r") as h5:
            if not h5.attrs.get("complete", False):
                problems.append(f"{path}: incomplete (rows {int(h5[schema.DONE][:].sum())} of {len(h5[schema.DONE])} done)")
            elif aggregates and not h5.attrs.get("aggregates_complete", False):
                problems.append(f"{path}: aggregates incomplete")
    if problems:
        raise ShardError(f"cannot stitch {len(paths)} shard(s): " + "; ".join(problems)
                         + "; rerun the same extract command (any number of ranks) to finish them")


def stitch(paths, out_path, aggregates):
    """Copy complete shards, in order, into one store at `out_path` (atomically); returns its row count."""
    check_shards_complete(paths, aggregates)
    with h5py.File(paths[0], "r") as first:
        attrs = dict(first.attrs)
        layout = _layout(first)
    heads = {name: [] for name in (schema.IDS, schema.LABEL_FINE, schema.LABEL_COARSE)}
    for path in paths:
        with h5py.File(path, "r") as h5:
            for name in heads:
                heads[name].append(h5[name].asstr()[:] if name == schema.IDS else h5[name][:])
    n = sum(len(ids) for ids in heads[schema.IDS])
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as out:
        # the same creation calls as features.store.create_store and the aggregates, in the same order
        out.create_dataset(schema.IDS, data=np.concatenate(heads[schema.IDS]).astype(object),
                           dtype=h5py.string_dtype())
        for name in (schema.LABEL_FINE, schema.LABEL_COARSE):
            out.create_dataset(name, data=np.concatenate(heads[name]))
        for name, shape, dtype in layout:
            create_dataset(out, name, (n,) + shape, dtype)
        _copy_rows(paths, out, [name for name, _, _ in layout])
        for key, value in attrs.items():
            out.attrs[key] = value
    return n


def _layout(h5):
    """[(name, row shape, dtype)] of every per-video dataset past ids and labels, in creation order."""
    names = []
    h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    skip = {schema.IDS, schema.LABEL_FINE, schema.LABEL_COARSE}
    return [(name, h5[name].shape[1:], h5[name].dtype) for name in names if name not in skip]


def _copy_rows(paths, out, names):
    offset = 0
    for path in paths:
        with h5py.File(path, "r") as h5:
            rows = len(h5[schema.IDS])
            for name in names:
                if _row_chunked(h5[name]) and _row_chunked(out[name]):
                    _copy_chunks(h5[name], out[name], rows, offset)
                    continue
                for s in range(0, rows, ROW_BLOCK):
                    e = min(rows, s + ROW_BLOCK)
                    out[name][offset + s:offset + e] = h5[name][s:e]
        offset += rows


def _row_chunked(dataset):
    """True when each row is one unfiltered chunk: rows then copy as raw bytes, ~10x faster than slices."""
    return (dataset.ndim > 1 and dataset.chunks == (1,) + dataset.shape[1:]
            and dataset.id.get_create_plist().get_nfilters() == 0)


def _copy_chunks(src, dst, rows, offset):
    origin = (0,) * (src.ndim - 1)
    for i in range(rows):
        _, raw = src.id.read_direct_chunk((i,) + origin)
        dst.id.write_direct_chunk((offset + i,) + origin, raw)


def merge_lines(sources, target):
    """Concatenate the text files that exist among `sources` into `target` (atomically)."""
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for source in sources:
            if Path(source).exists():
                out.write(Path(source).read_text(encoding="utf-8"))
