"""End-to-end `extract` throughput against the bare encoder forward pass, on the same items.

    python -m bench extract [--data ../shared/data/fashion --split labeled] [--n 256]
    python -m bench extract --data DATA --split labeled --n 400 --frames 8 --max-tokens 64 --rss

The bare pass times only the encoders (frames, the three text fields, the joined tokens) on inputs
decoded and tokenised beforehand, with the same batch size; the end-to-end run is `extract` itself
(decode + tokenise in workers, encode, write HDF5). Target: end-to-end >= 0.85 x bare.

--rss runs only the end-to-end extract and prints the process's resident memory after each batch
(first, middle, last and the largest step between batches): a streaming stage's memory must stay flat.
"""
import argparse
import tempfile
from pathlib import Path

import torch

from core.device import keep_freed_memory_mapped
import features.extract as extract_module
from bench.common import Table, data_dir, measured, peak_rss_mib, write_record
from features.annotations import annotations_path, read_annotations
from features.categories import load_category_map
from features.encoders import build_frame_encoder, build_text_encoder
from features.extract import ExtractOptions, VideoItems, encode_batch, extract_split
from features.frames import detect_source, open_source

BENCHMARK = {"kind": "speed", "summary": "extract end to end against the bare encoder forward on the same items (target >= 0.85)"}


def bare_forward_seconds(data_dir, split, videos, opts, frame_encoder, text_encoder):
    """Seconds of encoder forward alone over pre-decoded, pre-tokenised batches."""
    source = open_source(detect_source(data_dir, split), data_dir, split, opts.frames)
    items = VideoItems(videos, source, frame_encoder.preprocess, text_encoder.tokenizer, opts.max_tokens)
    batches = [[items[i] for i in range(s, min(s + opts.batch_size, len(videos)))]
               for s in range(0, len(videos), opts.batch_size)]
    with measured() as m:
        for batch in batches:
            encode_batch(batch, frame_encoder, text_encoder, opts, frame_encoder.dim, "cpu", [])
    return m.wall_s


def rss_mib():
    """This process's resident memory now (Linux /proc)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) // 1024 for line in fh if line.startswith("VmRSS:"))


def extract_rss(args, opts, cmap, frame_encoder, text_encoder):
    """Run extract_split once, recording RSS after each encoded batch; prints the curve's summary."""
    rss = []
    real = extract_module.encode_batch

    def recorded(*a, **kw):
        arrays = real(*a, **kw)
        rss.append(rss_mib())
        return arrays

    extract_module.encode_batch = recorded
    try:
        with tempfile.TemporaryDirectory() as cache:
            extract_split(args.data, args.split, cache, opts, detect_source(args.data, args.split),
                          load_category_map(cmap), frame_encoder, text_encoder, "cpu")
    finally:
        extract_module.encode_batch = real
    mid = len(rss) // 2
    print(f"RSS MiB after batch 1: {rss[0]}, batch {mid + 1}: {rss[mid]}, batch {len(rss)}: {rss[-1]} "
          f"(largest step {max(b - a for a, b in zip(rss, rss[1:])) if len(rss) > 1 else 0}); "
          f"peak {peak_rss_mib():.0f} MiB")
    print("per batch: " + " ".join(map(str, rss)))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench extract", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(data_dir("fashion")), help="[default: BENCH_DATA/fashion]")
    parser.add_argument("--split", default="labeled")
    parser.add_argument("--category-map", default=None)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "openvino"],
                        help="the encoders' runtime, both passes (features/runtime.py) [default: auto]")
    parser.add_argument("--rss", action="store_true", help="only the end-to-end extract, RSS after each batch")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cmap = args.category_map or str(Path(args.data) / "category_map.csv")
    opts = ExtractOptions(frames=args.frames, max_tokens=args.max_tokens, batch_size=args.batch_size,
                          workers=args.workers, device="cpu", category_map=cmap, limit=args.n, aggregates=None,
                          runtime=args.runtime)
    videos = read_annotations(annotations_path(args.data, args.split), load_category_map(cmap))[: args.n]
    tuned = keep_freed_memory_mapped()     # as `extract` does on the CPU, for both passes alike
    print(f"torch threads: {torch.get_num_threads()}, items: {len(videos)}, frames/video <= {args.frames}, "
          f"batch {args.batch_size}, workers {args.workers}, glibc thresholds raised: {tuned}")
    frame_encoder = build_frame_encoder(opts.frame_encoder, "cpu", "fp32", args.runtime)
    text_encoder = build_text_encoder(opts.text_encoder, "cpu", "fp32", args.runtime)
    if args.rss:
        extract_rss(args, opts, cmap, frame_encoder, text_encoder)
        return
    bare = bare_forward_seconds(args.data, args.split, videos, opts, frame_encoder, text_encoder)
    with tempfile.TemporaryDirectory() as cache, measured() as end_to_end:
        extract_split(args.data, args.split, cache, opts, detect_source(args.data, args.split),
                      load_category_map(cmap), frame_encoder, text_encoder, "cpu")
    n = len(videos)
    table = Table(f"{n} items of {Path(args.data).name}/{args.split}, <= {args.frames} frame(s) each, batch "
                  f"{args.batch_size}, {args.workers} worker(s), threads {torch.get_num_threads()}, runtime "
                  f"{text_encoder.runtime}",
                  ["pass", "videos/s", "seconds"])
    table.add("bare encoder forward (inputs decoded beforehand)", f"{n / bare:.1f}", f"{bare:.1f}")
    table.add("end-to-end extract (decode, tokenise, encode, write HDF5; models loaded beforehand)",
              f"{n / end_to_end.wall_s:.1f}", f"{end_to_end.wall_s:.1f}")
    print(f"ratio end-to-end / bare: {bare / end_to_end.wall_s:.2f} (target >= 0.85); peak RSS {peak_rss_mib():.0f} MiB")
    write_record("extract", argv, [table], {"end-to-end / bare forward (target >= 0.85)": bare / end_to_end.wall_s},
                 [f"peak RSS {peak_rss_mib():,.0f} MiB (both passes, one process)"])


if __name__ == "__main__":
    main()
