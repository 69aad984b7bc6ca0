"""`extract` over the ranks of a torchrun: shards in parallel, the codebook once, aggregates in parallel, one stitch.

    torchrun --nproc-per-node N run.py extract ...       (the same flags; WORLD_SIZE from the environment)

1. For each split the main rank records the shard plan (features/shards.py) and every rank extracts its
   contiguous range of shards (World.share), each into a store of its own, with its own fault and token
   records. A split whose own store is already there (from a one-process run or a finished stitch) is
   finished by the main rank alone, as one process would.
2. Barrier; the main rank checks every shard is complete (naming those that are not), writes the class
   names and fits the codebook over all shards in split and row order (the frames a one-process run
   samples), then every rank writes agg/* into its own shards.
3. Barrier; the main rank stitches each split's shards into CACHE/<split>.h5 (a copy), merges their
   fault and token records, deletes the shards and writes the report.
A rerun of the same command with any number of ranks (one process included) resumes from the shards.
"""
import json
import math
from pathlib import Path

import h5py

from features import schema
from features.aggregates import FrameAggregator, store_codebook, write_store_aggregates
from features.class_names import write_class_names
from features.codebook import CODEBOOK_FILE, Codebook
from features.extract import (create_or_check_store, extract_split, fill_store, remove_store, side_records,
                              split_input, split_report)
from features.shards import (check_shards_complete, load_or_make_plan, merge_lines, remove_shards, shard_dir,
                             shard_paths, stitch)
from features.store import is_complete


def extract_sharded(world, data_dir, kinds, cache_dir, options, category_map, text_encoder, device):
    """Every split of `kinds` ({split: frame layout}) into CACHE_DIR/<split>.h5; {split: report} on the
    main rank, {} on the others."""
    from features.encoders import build_frame_encoder
    frame_encoder, stores, reports = None, {}, {}
    for split, kind in kinds.items():
        if kind != "npy" and frame_encoder is None:
            frame_encoder = build_frame_encoder(options.frame_encoder, device, text_encoder.precision,
                                                text_encoder.runtime)
        encoder = frame_encoder if kind != "npy" else None
        job = split_input(data_dir, split, options, kind, category_map, encoder, text_encoder)
        plan = world.broadcast(_prepare_split(cache_dir, split, job, options) if world.is_main else None)
        if plan is None:                    # the split's own store exists: finish it as one process would
            if world.is_main:
                reports[split] = extract_split(data_dir, split, cache_dir, options, kind, category_map,
                                               encoder, text_encoder, device)
            stores[split] = [schema.store_path(cache_dir, split)]
            continue
        stores[split] = shard_paths(cache_dir, split, plan)
        first, last = world.share(len(stores[split]))
        for index in range(first, last):
            _extract_shard(stores[split][index], job, plan.bounds[index], category_map, encoder, text_encoder,
                           options, device)
    world.barrier()
    sharded = [p for split in stores for p in stores[split] if p != schema.store_path(cache_dir, split)]
    if world.is_main:
        check_shards_complete(sharded, aggregates=False)
        write_class_names(cache_dir, category_map, text_encoder, options.text_encoder)
    agg_reports = _aggregate(world, cache_dir, stores, options, device) if options.aggregates else {}
    if not world.is_main:
        return {}
    for split in stores:
        if split not in reports:
            reports[split] = _stitch_split(cache_dir, split, stores[split], options)
        path = schema.store_path(cache_dir, split)
        if options.aggregates:
            reports[split]["aggregates"] = agg_reports.get(path) or _agg_summary(path, len(stores[split]))
    return reports


def _prepare_split(cache_dir, split, job, options):
    """Main rank: None when the split's own store is there to finish, else the split's shard plan."""
    path = schema.store_path(cache_dir, split)
    if options.overwrite:
        remove_store(path)
        remove_shards(cache_dir, split)
    if path.exists():
        if shard_dir(cache_dir, split).exists() and is_complete(path):
            remove_shards(cache_dir, split)           # a stitch finished before its shards were deleted
        return None
    return load_or_make_plan(cache_dir, split, len(job.videos), _shard_unit(options))


def _shard_unit(options):
    """Rows a shard boundary must be a multiple of: extract batches, and agg/* batches when computed."""
    if options.aggregates is None:
        return options.batch_size
    return math.lcm(options.batch_size, options.aggregates.batch_size)


def _extract_shard(path, job, bounds, category_map, frame_encoder, text_encoder, options, device):
    start, end = bounds
    create_or_check_store(path, job.split, job.videos[start:end], category_map, job.config, options, job.dims,
                          job.inputs)
    if is_complete(path):
        return
    fill_store(path, job, start, end, frame_encoder, text_encoder, options, device,
               *side_records(path))


def _aggregate(world, cache_dir, stores, options, device):
    """The codebook fitted once (main rank) over every store in order, then agg/* of each rank's own
    stores (its shards; the main rank also the splits' own stores); {path: report} of what this rank wrote."""
    every = [p for paths in stores.values() for p in paths]
    if world.is_main:
        store_codebook(cache_dir, every, options.aggregates, options.overwrite)
    world.barrier()
    codebook = Codebook.load(Path(cache_dir) / CODEBOOK_FILE)
    aggregator = FrameAggregator(codebook, options.aggregates.poolings, device)
    mine = []
    for split, paths in stores.items():
        if paths == [schema.store_path(cache_dir, split)]:
            mine += paths if world.is_main else []
        else:
            first, last = world.share(len(paths))
            mine += paths[first:last]
    written = {p: write_store_aggregates(p, aggregator, codebook, options.aggregates, options.overwrite)
               for p in mine}
    world.barrier()
    return written


def _stitch_split(cache_dir, split, paths, options):
    """Main rank: the shards' records merged, the shards copied into CACHE/<split>.h5, then deleted."""
    path = schema.store_path(cache_dir, split)
    faults_path, tokens_path = side_records(path)
    check_shards_complete(paths, aggregates=options.aggregates is not None)
    merge_lines([side_records(p)[0] for p in paths], faults_path)
    merge_lines([side_records(p)[1] for p in paths], tokens_path)
    n = stitch(paths, path, aggregates=options.aggregates is not None)     # renamed into place last
    remove_shards(cache_dir, split)
    return split_report(path, split, n, faults_path, tokens_path, options)


def _agg_summary(path, n_shards):
    with h5py.File(path, "r") as h5:
        widths = json.loads(h5.attrs["agg_widths"])
        return {"rows": len(h5[schema.IDS]), "shards": n_shards, "widths": widths,
                "total_width": int(sum(widths.values()))}
