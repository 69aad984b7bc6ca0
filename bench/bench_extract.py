"""End-to-end `extract` throughput against the bare encoder forward pass, on the same items.

    python bench/bench_extract.py [--data ../shared/data/fashion --split labeled] [--n 256]

The bare pass times only the encoders (frames, the three text fields, the joined tokens) on inputs
decoded and tokenised beforehand, with the same batch size; the end-to-end run is `extract` itself
(decode + tokenise in workers, encode, write HDF5). Target: end-to-end >= 0.85 x bare.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/fashion"))
    parser.add_argument("--split", default="labeled")
    parser.add_argument("--category-map", default=None)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    cmap = args.category_map or str(Path(args.data) / "category_map.csv")
    opts = ExtractOptions(frames=args.frames, batch_size=args.batch_size, workers=args.workers, device="cpu",
                          category_map=cmap, limit=args.n)
    videos = read_annotations(annotations_path(args.data, args.split), load_category_map(cmap))[: args.n]
    tuned = keep_freed_memory_mapped()     # as `extract` does on the CPU, for both passes alike
    print(f"torch threads: {torch.get_num_threads()}, items: {len(videos)}, frames/video <= {args.frames}, "
          f"batch {args.batch_size}, workers {args.workers}, glibc thresholds raised: {tuned}")
    frame_encoder = build_frame_encoder(opts.frame_encoder, "cpu")
    text_encoder = build_text_encoder(opts.text_encoder, "cpu")
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
