"""`extract`: annotations + frames -> frozen-encoder embeddings in one HDF5 store per split.

    torchrun --nproc-per-node N run.py extract ...       (the same flags; WORLD_SIZE from the environment)

One driver for one process or many: one process is a world of size one (core/world.py) that fills
each split's own store; the ranks of a torchrun fill the shards of a fixed plan (features/shards.py) and
the main rank stitches them, bit for bit the store one process writes.

Workers decode and tokenise (DataLoader), the main process runs the encoders, a writer thread
writes finished batches, so the three overlap. Batches are fixed row ranges: a resumed run skips
the ranges already marked done and computes the rest exactly as an uninterrupted run would.
"""
import hashlib
import importlib.metadata
import json
import math
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from core import schema
from core.device import keep_freed_memory_mapped, resolve_device, resolve_precision
from core.records import write_json
from core.world import current_world
from features.aggregates import AggregateOptions, FrameAggregator, store_codebook, write_store_aggregates
from features.annotations import annotations_path, read_annotations
from features.categories import BUILTIN_MAP, load_category_map
from features.class_names import write_class_names
from features.codebook import CODEBOOK_FILE, Codebook
from features.frames import MediaFault, check_source, detect_source, open_source
from features.inputs import input_identity
from features.store import (StoreDims, StoreMismatch, StoreReader, StoreWriter, check_config, check_inputs,
                            create_store, is_complete, is_store)
from features.shards import (check_shards_complete, load_or_make_plan, merge_lines, remove_shards, shard_dir,
                             shard_paths, stitch)
from features.text_coverage import batch_record, field_token_counts, unk_summary, warn_unreadable


class ExtractError(RuntimeError):
    pass


@dataclass
class ExtractOptions:
    frame_encoder: str = "efficientnet-lite0"   # or clip:<arch>@<tag or checkpoint>
    text_encoder: str = "minilm"                # or bert:<dir or hub name>
    frames: int = 32                            # F: frames kept per video, sampled uniformly
    max_tokens: int = 128                       # T: tokens of title [SEP] ocr [SEP] asr kept
    frames_from: str = "auto"                   # auto | zip | npy | video
    category_map: str | None = None             # CSV; None = the challenge's 200-class map
    annotations: str | None = None              # overrides DATA/annotations/<split>.json (one split)
    limit: int | None = None                    # only the first N videos of each split
    batch_size: int = 32                        # videos per batch, the unit of resume
    frame_batch: int = 0                        # most images per encoder forward; 0: 32 on CPU, 256 on GPU
    workers: int = 2                            # DataLoader processes decoding and tokenising
    threads: int = 0                            # torch CPU threads of the encoders; 0: torch's default (under
                                                # torchrun: each rank's share of the cores)
    device: str = "auto"                        # auto | cpu | cuda
    precision: str = "auto"                     # auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, bf16/fp16 on CUDA)
    runtime: str = "auto"                       # auto | torch | onnx | openvino (auto: onnx on CPU fp32, else torch)
    on_error: str = "skip"                      # skip (mask, count, report) | fail
    overwrite: bool = False
    aggregates: AggregateOptions | None = field(default_factory=AggregateOptions)   # None: skip agg/*


# images per encoder forward when --frame-batch is 0: EfficientNet-Lite0 on the CPU (1 thread) ran
# 12.4 img/s with +0.55 GiB at 32 images against 9.1 img/s with +2.1 GiB at 128 (B x F can be 1,024)
FRAME_BATCH = {"cpu": 32, "cuda": 256}

IDENTITY_OPTIONS = ("frame_encoder", "text_encoder", "frames", "max_tokens", "frames_from", "limit")


def extract(data_dir, splits, cache_dir, options, expect=None):
    """Extract every split into CACHE_DIR/<split>.h5; returns {split: report dict} on the main rank (the
    other ranks of a torchrun get {}). `expect(config)`, when given, sees each split's store identity once
    the encoders are loaded, before its store is created or any video encoded, and raises to refuse it
    (predict: the model's identity).

    One driver for any number of processes; one process is a world of size one:
    1. each split is filled as stores: its own CACHE/<split>.h5 (one process, or a store already there),
       or the shards of its plan (features/shards.py) under torchrun or when an interrupted one left them,
       each rank filling its contiguous range of shards (World.share);
    2. the main rank checks every shard is complete, writes the class names and fits the codebook once
       over every store in split and row order; every rank writes agg/* into its own stores;
    3. the main rank stitches each sharded split into CACHE/<split>.h5 and writes its report.
    A rerun of the same command with any number of ranks resumes from the stores and shards left."""
    from features.encoders import build_frame_encoder
    _check_options(splits, options)
    kinds = frame_sources(data_dir, splits, options)          # before any encoder is loaded
    world = current_world(options.device)                         # rank 0 of 1 without torchrun
    device = world.device(options.device)                         # a rank's own GPU under torchrun
    category_map = load_category_map(options.category_map)
    text_encoder = _text_encoder(world, device, options)
    frame_encoder, stores, reports = None, {}, {}
    for split, kind in kinds.items():
        if kind != "npy" and frame_encoder is None:
            frame_encoder = build_frame_encoder(options.frame_encoder, device, text_encoder.precision,
                                                text_encoder.runtime)
        encoder = frame_encoder if kind != "npy" else None
        job = split_input(data_dir, split, options, kind, category_map, encoder, text_encoder)
        if expect is not None:
            expect(job.config)
        plan = world.broadcast(_plan_split(world, cache_dir, job, options) if world.is_main else None)
        if plan is None:                    # the split's own store: filled by the main rank alone
            if world.is_main:
                reports[split] = _fill_split_store(cache_dir, job, category_map, encoder, text_encoder, options,
                                                   device)
            stores[split] = [schema.store_path(cache_dir, split)]
            continue
        stores[split] = shard_paths(cache_dir, split, plan)
        first, last = world.share(len(stores[split]))
        for index in range(first, last):
            _fill_shard(stores[split][index], job, plan.bounds[index], category_map, encoder, text_encoder,
                        options, device)
    world.barrier()
    if world.is_main:
        check_shards_complete(_shards(cache_dir, stores), aggregates=False)
        # after the stores: a store refusing this encoder must not leave class names from it beside them
        write_class_names(cache_dir, category_map, text_encoder, options.text_encoder)  # when the map names them
    agg_reports = _aggregate(world, cache_dir, stores, options, device) if options.aggregates is not None else {}
    if not world.is_main:
        return {}
    for split in stores:
        if split not in reports:
            reports[split] = _stitch_split(cache_dir, split, stores[split], options)
        path = schema.store_path(cache_dir, split)
        if options.aggregates is not None:
            reports[split]["aggregates"] = agg_reports.get(path) or _agg_summary(path, len(stores[split]))
    return reports


def _check_options(splits, options):
    if options.annotations and len(splits) != 1:
        raise ExtractError("--annotations names one file, so give exactly one --split")
    for name, least in (("frames", 1), ("batch_size", 1), ("frame_batch", 0), ("threads", 0), ("limit", 1)):
        if getattr(options, name) is not None and getattr(options, name) < least:
            raise ExtractError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(options, name)}")


def _text_encoder(world, device, options):
    """The text encoder in the run's precision (part of each store's identity), after the CPU threads are set."""
    from features.encoders import build_text_encoder
    precision = resolve_precision(options.precision, device)
    if device == "cpu":
        keep_freed_memory_mapped()        # ~3x faster CPU encoders (see its docstring)
        if options.threads:
            torch.set_num_threads(options.threads)               # e.g. 1 when other jobs share the cores
        elif world.distributed:
            torch.set_num_threads(world.cpu_threads())           # the ranks of a node share its cores
    text_encoder = build_text_encoder(options.text_encoder, device, precision, options.runtime)
    if options.max_tokens > text_encoder.max_tokens:
        raise ExtractError(f"--max-tokens {options.max_tokens} is more than {options.text_encoder} "
                           f"accepts ({text_encoder.max_tokens})")
    return text_encoder


def _plan_split(world, cache_dir, job, options):
    """Main rank: None when the split is filled as its own store (one process, or the store is already
    there to finish), else the split's shard plan (under torchrun, or shards of one are there)."""
    path = schema.store_path(cache_dir, job.split)
    if options.overwrite:
        remove_store(path)
        remove_shards(cache_dir, job.split)
    if path.exists():
        if shard_dir(cache_dir, job.split).exists() and is_complete(path):
            remove_shards(cache_dir, job.split)      # a stitch finished before its shards were deleted
        return None
    if not world.distributed and not shard_dir(cache_dir, job.split).exists():
        return None
    return load_or_make_plan(cache_dir, job.split, len(job.videos), _shard_unit(options))


def _shard_unit(options):
    """Rows a shard boundary must be a multiple of: extract batches, and agg/* batches when computed."""
    if options.aggregates is None:
        return options.batch_size
    return math.lcm(options.batch_size, options.aggregates.batch_size)


def _shards(cache_dir, stores):
    """Every shard path of `stores` ({split: [store paths]}): all but the splits' own stores."""
    return [p for split, paths in stores.items() for p in paths if p != schema.store_path(cache_dir, split)]


def frame_sources(data_dir, splits, options):
    """{split: frame layout}; refuses a split without its annotations file or without frames."""
    kinds = {}
    for split in splits:
        ann_path = Path(options.annotations) if options.annotations else annotations_path(data_dir, split)
        if not ann_path.exists():
            present = _annotated_splits(data_dir)
            raise ExtractError(f"{ann_path}: no annotations for split '{split}'; splits with annotations "
                               f"in {Path(data_dir) / 'annotations'}: {', '.join(present) or 'none'}")
        auto = options.frames_from == "auto"
        kinds[split] = detect_source(data_dir, split) if auto else check_source(data_dir, split, options.frames_from)
        if kinds[split] == "npy":          # a feature zip that is not one is refused before any encoder loads
            open_source("npy", data_dir, split, options.frames).probe_dim()
    return kinds


@dataclass
class SplitInput:
    """What extracting one split needs, read once: its videos, frame source, identity and dims."""
    split: str
    videos: list
    source: object
    frame_dim: int           # D
    config: dict             # the store's identity
    dims: StoreDims
    inputs: dict             # what it is made from (features/inputs.py): annotations sha256, media stat digest


def split_input(data_dir, split, options, kind, category_map, frame_encoder, text_encoder):
    ann_path = Path(options.annotations) if options.annotations else annotations_path(data_dir, split)
    videos = read_annotations(ann_path, category_map)[: options.limit]
    if not videos:
        raise ExtractError(f"{ann_path}: split '{split}' lists no videos (an empty list); give a split with "
                           "at least one video")
    source = open_source(kind, data_dir, split, options.frames)
    if kind == "npy":
        source.dim = source.probe_dim()
    frame_dim = source.dim if kind == "npy" else frame_encoder.dim
    config = _store_config(options, kind, category_map, frame_encoder, text_encoder)
    dims = StoreDims(options.frames, frame_dim, text_encoder.dim, options.max_tokens)
    inputs = input_identity(ann_path, source, [v.id for v in videos])
    return SplitInput(split, videos, source, frame_dim, config, dims, inputs)


def extract_split(data_dir, split, cache_dir, options, kind, category_map, frame_encoder, text_encoder, device,
                  expect=None):
    """One split into its own store CACHE_DIR/<split>.h5 in this process (predict's temporary split)."""
    job = split_input(data_dir, split, options, kind, category_map, frame_encoder, text_encoder)
    if expect is not None:
        expect(job.config)
    return _fill_split_store(cache_dir, job, category_map, frame_encoder, text_encoder, options, device)


def _fill_split_store(cache_dir, job, category_map, frame_encoder, text_encoder, options, device):
    """Create (or check, to resume) the split's own store, fill every row, write its report."""
    path = schema.store_path(cache_dir, job.split)
    _prepare_store(path, job, category_map, options)
    fill_store(path, job, (0, len(job.videos)), frame_encoder, text_encoder, options, device)
    return split_report(path, job.split, len(job.videos), options)


def _fill_shard(path, job, bounds, category_map, frame_encoder, text_encoder, options, device):
    """Rows `bounds` (start, end) of the split into the shard store at `path`, resuming it when there."""
    create_or_check_store(path, job, bounds, category_map, options)
    if is_complete(path):
        return
    fill_store(path, job, bounds, frame_encoder, text_encoder, options, device)


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
    return split_report(path, split, n, options)


def _agg_summary(path, n_shards):
    """The aggregates report of a stitched store (its rows were aggregated shard by shard)."""
    with h5py.File(path, "r") as h5:
        widths = json.loads(h5.attrs["agg_widths"])
        return {"rows": len(h5[schema.IDS]), "shards": n_shards, "widths": widths,
                "total_width": int(sum(widths.values()))}


def split_report(path, split, n_videos, options):
    """The report of the store at `path` from its side records, written beside it (<split>.report.json)."""
    faults_path, tokens_path = side_records(path)
    report = _write_report(path, split, n_videos, faults_path, unk_summary(tokens_path))
    warn_unreadable(split, report["text_unk"], options.text_encoder)
    return report


def fill_store(path, job, rows, frame_encoder, text_encoder, options, device):
    """Encode the split's rows `rows` = (start, end) into the store at `path` (its row 0 is the split's row
    `start`), skipping batches already done, and mark it complete; faults and token counts go to the store's
    side records. Batches begin at multiples of --batch-size from `start`, so with `start` such a multiple
    they are the one-process run's batches."""
    start, end = rows
    faults_path, tokens_path = side_records(path)
    writer = StoreWriter(path)
    try:
        done = writer.done_rows()
        n = end - start
        batches = [list(range(s, min(s + options.batch_size, n)))
                   for s in range(0, n, options.batch_size)
                   if not done[s:s + options.batch_size].all()]
        items = VideoItems(job.videos[start:end], job.source, frame_encoder.preprocess if frame_encoder else None,
                           text_encoder.tokenizer, options.max_tokens)
        loader = DataLoader(items, batch_sampler=batches, collate_fn=list, num_workers=options.workers,
                            persistent_workers=False, prefetch_factor=4 if options.workers else None,
                            worker_init_fn=_yield_to_encoder if torch.device(device).type == "cpu" else None)
        desc = f"extract {job.split}" + (f" rows {start}-{end}" if (start, end) != (0, len(job.videos)) else "")
        bar = tqdm(total=n, initial=int(done.sum()), unit="video", desc=desc)
        with _BatchWriter(writer, faults_path, tokens_path, bar) as sink:
            for batch in loader:
                faults = [dict(id=it["id"], file=f, reason=r, kind=k) for it in batch for f, r, k in it["faults"]]
                arrays = encode_batch(batch, frame_encoder, text_encoder, options, job.frame_dim, device, faults)
                if faults and options.on_error == "fail":
                    first = faults[0]
                    raise ExtractError(f"{first['file']}: video {first['id']}: {first['reason']} "
                                       "(--on-error fail; use --on-error skip to mask and report it)")
                # token records keyed by the split's row, so shards' records merge without collisions
                sink.put(batch[0]["row"], arrays, faults, batch_record(start + batch[0]["row"], batch))
        bar.close()
        writer.mark_complete()
    finally:
        writer.close()


def _store_config(options, kind, category_map, frame_encoder, text_encoder):
    identity = {k: getattr(options, k) for k in IDENTITY_OPTIONS}
    identity["frames_from"] = kind
    map_file = Path(options.category_map) if options.category_map else BUILTIN_MAP
    return {
        "precision": text_encoder.precision,            # the frame encoder runs in the same one
        "runtime": text_encoder.runtime,                # and on the same runtime (features/runtime.py)
        "frame_encoder": frame_encoder.name if frame_encoder else "precomputed",
        "frame_encoder_checksum": frame_encoder.checksum if frame_encoder else None,
        "text_encoder": text_encoder.name,
        "text_encoder_checksum": text_encoder.checksum,
        "category_map_sha256": hashlib.sha256(map_file.read_bytes()).hexdigest(),
        "options": identity,
    }


def side_records(store_path):
    """(faults, token counts): the JSONL records written beside a store, <name>.faults.jsonl and
    <name>.tokens.jsonl, appended batch by batch so a resumed run reports each row once."""
    return Path(store_path).with_suffix(".faults.jsonl"), Path(store_path).with_suffix(".tokens.jsonl")


def remove_store(store_path):
    """A store and its side records (for --overwrite); a file under the store's name that is not a store
    (another command's HDF5 file, say) is refused, never deleted."""
    if Path(store_path).exists() and not is_store(store_path):
        raise ExtractError(f"{store_path}: not a feature store, so --overwrite does not delete it; give --out a "
                           "cache directory of its own")
    for path in (Path(store_path), *side_records(store_path)):
        path.unlink(missing_ok=True)


def _prepare_store(path, job, category_map, options):
    """Create the split's own store, or check that an existing one is this run's to resume."""
    if options.overwrite:
        remove_store(path)
    create_or_check_store(path, job, (0, len(job.videos)), category_map, options)


def create_or_check_store(path, job, rows, category_map, options):
    """A new empty store for the split's rows `rows` = (start, end) of `job` (its videos, identity, dims and
    inputs), or the existing one when it was made for them, from the same inputs (annotations and media
    unchanged), with this config; else StoreMismatch."""
    videos = job.videos[rows[0]:rows[1]]
    if path.exists():
        check_config(path, job.config)
        _check_same_ids(path, videos)
        check_inputs(path, job.inputs)
        return
    fine = [category_map.fine_index(v.category_id) if v.category_id else -1 for v in videos]
    coarse = [int(category_map.fine_to_coarse[f]) if f >= 0 else -1 for f in fine]
    create_store(path, job.split, [v.id for v in videos], fine, coarse, job.dims, job.config, category_map,
                 environment=_environment(options), inputs=job.inputs)


def _check_same_ids(path, videos):
    stored = StoreReader(path, require_complete=False).ids
    if len(stored) != len(videos) or any(a != b.id for a, b in zip(stored, videos)):
        raise StoreMismatch(f"{path}: holds other videos than the annotations now list")


def _environment(options):
    """What the store was made on and with; recorded, never compared (the config is the identity)."""
    import transformers
    device = torch.device(resolve_device(options.device))
    versions = {"torch": torch.__version__, "numpy": np.__version__, "h5py": h5py.__version__,
                "transformers": transformers.__version__, "device": device.type,
                "category_map_file": str(Path(options.category_map).resolve()) if options.category_map else None}
    if device.type == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(device)
    try:       # the installed version, not an import: importing open_clip took 1.5-2 s before the first batch
        versions["open_clip"] = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    return versions


# niceness of a decode worker on the CPU: it runs batches ahead (prefetch), so it can take the time the
# encoder leaves, and the encoder's thread (the critical path) is not preempted by its own decoding
WORKER_NICENESS = 5


def _yield_to_encoder(_worker_id):
    """DataLoader worker_init_fn on the CPU: lower this decode worker's priority (WORKER_NICENESS). On a GPU the
    workers feed the device and keep theirs."""
    os.nice(WORKER_NICENESS)


class VideoItems(Dataset):
    """One video's frames (preprocessed) and tokenised text; runs in DataLoader workers."""

    def __init__(self, videos, source, preprocess, tokenizer, max_tokens):
        self.videos, self.source, self.preprocess = videos, source, preprocess
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, row):
        video = self.videos[row]
        frames, faults = None, []
        try:
            loaded = self.source.load(video.id)
            faults = [(loaded.file, fault.reason, fault.kind) for fault in loaded.faults]
            frames = loaded.frames
            if self.preprocess is not None:
                frames = torch.stack([self.preprocess(image) for image in frames])   # (n, 3, H, W)
        except MediaFault as fault:
            faults.append((fault.file, fault.reason, fault.kind))
        tok = dict(truncation=True, max_length=self.max_tokens)
        sep = f" {self.tokenizer.sep_token or '|'} "
        field_ids = [self.tokenizer(t, **tok)["input_ids"] if t else None for t in video.texts]
        return {
            "row": row, "id": video.id, "frames": frames, "faults": faults, "field_ids": field_ids,
            "unk_counts": field_token_counts(self.tokenizer, field_ids),
            "joined_ids": self.tokenizer(sep.join(video.texts), **tok)["input_ids"],
            "text_len": [len(t) for t in video.texts],
        }


def encode_batch(batch, frame_encoder, text_encoder, options, frame_dim, device, faults):
    """A batch of items -> {dataset name: (B, ...) array} as the store holds them."""
    frame_emb, frame_mask = _encode_frames(batch, frame_encoder, options, frame_dim, device, faults)
    pooled, field_mask = _encode_fields(batch, text_encoder, device)
    tokens, token_mask = _encode_joined(batch, text_encoder, options.max_tokens, device)
    return {
        schema.FRAME_EMB: frame_emb, schema.FRAME_MASK: frame_mask,
        schema.TEXT_POOLED: pooled, schema.TEXT_FIELD_MASK: field_mask,
        schema.TEXT_LEN: np.array([it["text_len"] for it in batch], np.int32),
        schema.TEXT_TOKENS: tokens, schema.TEXT_TOKEN_MASK: token_mask,
    }


def _encode_frames(batch, frame_encoder, options, frame_dim, device, faults):
    frame_emb = np.zeros((len(batch), options.frames, frame_dim), np.float16)     # (B, F, D)
    frame_mask = np.zeros((len(batch), options.frames), bool)                    # (B, F)
    present = [(b, it["frames"]) for b, it in enumerate(batch) if it["frames"] is not None]
    if not present:
        return frame_emb, frame_mask
    if frame_encoder is None:
        vectors = [np.asarray(frames, np.float16) for _, frames in present]
    else:
        images = torch.cat([frames for _, frames in present])              # (sum n, 3, H, W)
        step = frame_step(options, device)
        flat = np.concatenate([_encode_images(frame_encoder, images[s:s + step], step, device)
                               for s in range(0, len(images), step)])     # (sum n, D)
        cuts = np.cumsum([len(frames) for _, frames in present])[:-1]
        vectors = np.split(flat, cuts)
    for (b, _), vec in zip(present, vectors):
        if not np.isfinite(vec).all():
            faults.append(dict(id=batch[b]["id"], file="(encoder output)", reason="NaN or inf in frame embedding",
                               kind="NaN or inf in frame embedding"))
            continue
        frame_emb[b, : len(vec)] = vec
        frame_mask[b, : len(vec)] = True
    return frame_emb, frame_mask


def frame_step(options, device):
    """Images per frame-encoder forward: --frame-batch (0: FRAME_BATCH of the device), never more than the
    most images a batch can hold (B x F), so a small run does not pad its forwards far beyond its images."""
    step = options.frame_batch or FRAME_BATCH[torch.device(device).type]
    return min(step, options.batch_size * options.frames)


def _encode_images(frame_encoder, images, step, device):
    """(n, D) float32 embeddings of n <= step images; on the CPU every forward sees exactly `step` images.

    oneDNN caches a convolution primitive, with its memory, per input shape: with the last chunk of each
    batch a new size (sum of frames mod step), extract's memory grew by ~0.1-0.5 GiB per new size seen
    (EfficientNet-Lite0, demo labelled split: 2.0 -> 3.3 GiB over 8 batches; flat with
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0). Zero images pad the chunk to one shape and their rows are dropped;
    the encoders hold no cross-sample operation, so the rest agree to float tolerance (~4e-6). The GPU
    path has no such cache and is left unpadded (up to step - 1 images a batch would be wasted there)."""
    n = len(images)
    if torch.device(device).type == "cpu" and n < step:
        images = torch.cat([images, images.new_zeros((step - n, *images.shape[1:]))])   # (step, 3, H, W)
    return frame_encoder.encode(images.to(device)).float().cpu().numpy()[:n]


def _pad(id_lists, pad_id):
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(id_lists), width), dtype=torch.long)
    for i, ids in enumerate(id_lists):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
    return input_ids, attention


def _encode_fields(batch, text_encoder, device):
    n_fields = len(schema.TEXT_FIELDS)
    pooled = np.zeros((len(batch), n_fields, text_encoder.dim), np.float16)   # (B, 3, Dt)
    field_mask = np.zeros((len(batch), n_fields), bool)                      # (B, 3)
    pad_id = text_encoder.tokenizer.pad_token_id or 0
    for f in range(n_fields):
        rows = [b for b, it in enumerate(batch) if it["field_ids"][f] is not None]
        if not rows:
            continue
        input_ids, attention = _pad([batch[b]["field_ids"][f] for b in rows], pad_id)
        _, field_pooled = text_encoder.encode(input_ids.to(device), attention.to(device))
        pooled[rows, f] = field_pooled.float().cpu().numpy()
        field_mask[rows, f] = True
    return pooled, field_mask


def _encode_joined(batch, text_encoder, max_tokens, device):
    tokens = np.zeros((len(batch), max_tokens, text_encoder.dim), np.float16)   # (B, T, Dt)
    token_mask = np.zeros((len(batch), max_tokens), bool)                      # (B, T)
    input_ids, attention = _pad([it["joined_ids"] for it in batch], text_encoder.tokenizer.pad_token_id or 0)
    hidden, _ = text_encoder.encode(input_ids.to(device), attention.to(device))
    width = hidden.shape[1]
    tokens[:, :width] = hidden.float().cpu().numpy() * attention.numpy()[..., None]
    token_mask[:, :width] = attention.numpy().astype(bool)
    return tokens, token_mask


class _BatchWriter:
    """Writes batches on a thread of its own (bounded queue), faults first, then rows, then done flags."""

    def __init__(self, writer, faults_path, tokens_path, bar):
        self.writer, self.faults_path, self.tokens_path, self.bar = writer, faults_path, tokens_path, bar
        self.queue = queue.Queue(maxsize=2)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def put(self, start, arrays, faults, token_record):
        if self.error:
            raise self.error
        self.queue.put((start, arrays, faults, token_record))

    def _run(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.error:
                continue
            try:
                start, arrays, faults, token_record = job
                if faults:
                    _append_synced(self.faults_path, [json.dumps(f) + "\n" for f in faults])
                _append_synced(self.tokens_path, [token_record])
                self.writer.write_rows(start, arrays)
                self.bar.update(len(arrays[schema.FRAME_MASK]))
            except Exception as err:     # re-raised in the main thread by put() or __exit__
                self.error = err

    def __exit__(self, exc_type, exc, tb):
        self.queue.put(None)
        self.thread.join()
        if self.error and exc_type is None:
            raise self.error


def _append_synced(path, lines):
    with open(path, "a", encoding="utf-8") as fh:
        fh.writelines(lines)
        fh.flush()
        os.fsync(fh.fileno())


def _write_report(path, split, n_videos, faults_path, text_unk):
    """The JSON report beside the store: every faulted video with its file and reason, counted."""
    faults, seen = [], set()
    if faults_path.exists():
        for line in faults_path.read_text(encoding="utf-8").splitlines():
            fault = json.loads(line)
            key = (fault["id"], fault["file"], fault["reason"])
            if key not in seen:                # a resumed batch may have reported it twice
                seen.add(key)
                faults.append(fault)
    counts = {}
    for fault in faults:                       # records of older runs have no kind: the reason's head
        kind = fault.get("kind") or fault["reason"].split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    report = {"split": split, "store": str(path), "n_videos": n_videos,
              "n_videos_with_faults": len({f["id"] for f in faults}), "fault_counts": counts,
              "text_unk": text_unk, "faults": faults}
    write_json(path.with_name(f"{split}.report.json"), report)
    return report


def list_splits(data_dir):
    """Every split that has an annotations file, labelled first."""
    names = _annotated_splits(data_dir)
    if not names:
        raise ExtractError(f"{data_dir}/annotations: no <split>.json annotation files")
    return names


def _annotated_splits(data_dir):
    names = sorted(p.stem for p in (Path(data_dir) / "annotations").glob("*.json"))
    return sorted(names, key=lambda n: (n != schema.LABELLED_SPLIT, n))
