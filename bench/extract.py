"""End-to-end `extract` throughput against the bare encoder forward pass, on the same items.

    python -m bench extract [--data ../shared/data/fashion --split labeled] [--n 256]
    python -m bench extract --data DATA --split labeled --n 400 --frames 8 --max-tokens 64 --rss

The bare pass times only the encoders (frames, the three text fields, the joined tokens) on inputs
decoded and tokenised beforehand, with the same batch size; the end-to-end run is `extract` itself
(decode + tokenise in workers, encode, write HDF5). Target: end-to-end >= 0.95 x bare (issue 24).

--rounds N alternates the two passes N times (bare, extract, bare, extract, ...) and reports the median of
the per-round ratios, so a load that comes and goes on a shared machine moves both passes alike. Each pass
also records CPU seconds: this process (the encoders' forward, the writer thread) and its reaped children
(the decode workers). End to end at the bare pass's own CPU means the pipeline adds no work on the encoder's
path, and a wall ratio below 1 is then time spent waiting for a core (other processes, the decode worker).

--rss runs only the end-to-end extract and prints the process's resident memory after each batch
(first, middle, last and the largest step between batches): a streaming stage's memory must stay flat.
"""
import argparse
import resource
import statistics
import tempfile
import time
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

BENCHMARK = {"kind": "speed", "summary": "extract end to end against the bare encoder forward on the same items (target >= 0.95)"}


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


def cpu_seconds():
    """(this process's CPU seconds, its reaped children's), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def timed_pass(run):
    """(wall s, own CPU s, children's CPU s) of run()."""
    own0, child0 = cpu_seconds()
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    own1, child1 = cpu_seconds()
    return wall, own1 - own0, child1 - child0


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
    parser.add_argument("--rounds", type=int, default=1, help="bare and end-to-end passes alternated N times")
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
    def bare_pass():
        bare_forward_seconds(args.data, args.split, videos, opts, frame_encoder, text_encoder)

    def extract_pass():
        with tempfile.TemporaryDirectory() as cache:
            extract_split(args.data, args.split, cache, opts, detect_source(args.data, args.split),
                          load_category_map(cmap), frame_encoder, text_encoder, "cpu")

    rounds = [(timed_pass(bare_pass), timed_pass(extract_pass)) for _ in range(args.rounds)]
    ratio = statistics.median(b[0] / e[0] for b, e in rounds)
    n = len(videos)
    table = Table(f"{n} items of {Path(args.data).name}/{args.split}, <= {args.frames} frame(s) each, batch "
                  f"{args.batch_size}, {args.workers} worker(s), threads {torch.get_num_threads()}, runtime "
                  f"{text_encoder.runtime}, {args.rounds} round(s) alternated",
                  ["round", "pass", "videos/s", "seconds", "CPU s (this process)", "CPU s (decode workers)"])
    for r, passes in enumerate(rounds, 1):
        for name, (wall, own, children) in zip(("bare encoder forward (inputs decoded beforehand)",
                                                "end-to-end extract (decode, tokenise, encode, write HDF5)"), passes):
            table.add(str(r), name, f"{n / wall:.1f}", f"{wall:.1f}", f"{own:.1f}", f"{children:.1f}")
    print(f"ratio end-to-end / bare (median of {args.rounds} round(s)): {ratio:.2f} (target >= 0.95); "
          f"peak RSS {peak_rss_mib():.0f} MiB")
    walls = [b[0] / e[0] for b, e in rounds]
    write_record("extract", argv, [table],
                 {"end-to-end / bare forward, wall, median of rounds (target >= 0.95)": ratio,
                  "end-to-end / bare forward, wall, lowest round": min(walls),
                  "end-to-end / bare forward, wall, highest round": max(walls),
                  "end-to-end / bare forward, CPU of this process (median)": statistics.median(
                      e[1] / b[1] for b, e in rounds),
                  "decode workers' CPU / bare forward's CPU (median)": statistics.median(
                      e[2] / b[1] for b, e in rounds)},
                 [f"peak RSS {peak_rss_mib():,.0f} MiB (both passes, one process)",
                  "wall ratio = bare seconds / end-to-end seconds of the same round; the CPU ratios say what the "
                  "pipeline adds as work (this process: encoders, writer thread; the workers: decode, tokenise), "
                  "whatever the machine's load"],
                 variant=f"{Path(args.data).name}.{text_encoder.runtime}")


if __name__ == "__main__":
    main()
