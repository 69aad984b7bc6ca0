"""End-to-end `extract` throughput against the bare encoder forward pass, on the same items.

    python bench/bench_extract.py [--data ../shared/data/fashion --split labeled] [--n 256]
    python bench/bench_extract.py --data DATA --split labeled --n 400 --frames 8 --max-tokens 64 --rss

The bare pass times only the encoders (frames, the three text fields, the joined tokens) on inputs
decoded and tokenised beforehand, with the same batch size; the end-to-end run is `extract` itself
(decode + tokenise in workers, encode, write HDF5). Target: end-to-end >= 0.85 x bare.

--rss runs only the end-to-end extract and prints the process's resident memory after each batch
(first, middle, last and the largest step between batches): a streaming stage's memory must stay flat.
"""
import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from features.annotations import annotations_path, read_annotations  # noqa: E402
from features.categories import load_category_map  # noqa: E402
from features.device import keep_freed_memory_mapped  # noqa: E402
from features.encoders import build_frame_encoder, build_text_encoder  # noqa: E402
import features.extract as extract_module  # noqa: E402
from features.extract import ExtractOptions, VideoItems, encode_batch, extract_split  # noqa: E402
from features.frames import detect_source, open_source  # noqa: E402


def bare_forward_seconds(data_dir, split, videos, opts, frame_encoder, text_encoder):
    """Seconds of encoder forward alone over pre-decoded, pre-tokenised batches."""
    source = open_source(detect_source(data_dir, split), data_dir, split, opts.frames)
    items = VideoItems(videos, source, frame_encoder.preprocess, text_encoder.tokenizer, opts.max_tokens)
    batches = [[items[i] for i in range(s, min(s + opts.batch_size, len(videos)))]
               for s in range(0, len(videos), opts.batch_size)]
    start = time.perf_counter()
    for batch in batches:
        encode_batch(batch, frame_encoder, text_encoder, opts, frame_encoder.dim, "cpu", [])
    return time.perf_counter() - start


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
          f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
    print("per batch: " + " ".join(map(str, rss)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/fashion"))
    parser.add_argument("--split", default="labeled")
    parser.add_argument("--category-map", default=None)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--rss", action="store_true", help="only the end-to-end extract, RSS after each batch")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cmap = args.category_map or str(Path(args.data) / "category_map.csv")
    opts = ExtractOptions(frames=args.frames, max_tokens=args.max_tokens, batch_size=args.batch_size,
                          workers=args.workers, device="cpu", category_map=cmap, limit=args.n, aggregates=None)
    videos = read_annotations(annotations_path(args.data, args.split), load_category_map(cmap))[: args.n]
    tuned = keep_freed_memory_mapped()     # as `extract` does on the CPU, for both passes alike
    print(f"torch threads: {torch.get_num_threads()}, items: {len(videos)}, frames/video <= {args.frames}, "
          f"batch {args.batch_size}, workers {args.workers}, glibc thresholds raised: {tuned}")
    frame_encoder = build_frame_encoder(opts.frame_encoder, "cpu")
    text_encoder = build_text_encoder(opts.text_encoder, "cpu")
    if args.rss:
        extract_rss(args, opts, cmap, frame_encoder, text_encoder)
        return
    bare = bare_forward_seconds(args.data, args.split, videos, opts, frame_encoder, text_encoder)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        extract_split(args.data, args.split, cache, opts, detect_source(args.data, args.split),
                      load_category_map(cmap), frame_encoder, text_encoder, "cpu")
        end_to_end = time.perf_counter() - start
    n = len(videos)
    print(f"bare encoder forward : {n / bare:8.1f} videos/s ({bare:.1f} s)")
    print(f"end-to-end extract   : {n / end_to_end:8.1f} videos/s ({end_to_end:.1f} s, models loaded beforehand)")
    print(f"ratio end-to-end / bare: {bare / end_to_end:.2f} (target >= 0.85)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("reproduce: python bench/bench_extract.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
