"""`predict` latency per video against the encoder forward alone, on the same videos.

    PYTHONPATH=. python bench/bench_predict.py --demo demo_out [--split test]

Takes a finished `python run.py demo --out DIR` (DIR/data, DIR/run, DIR/stack) and labels DIR/data's
split twice, side by side in one process:
    bare     the frozen encoders' forward pass alone (frames, text fields, joined tokens) on inputs
             decoded and tokenised beforehand (bench/bench_extract.py's measure), the run's extract options;
    predict  inference.predict.predict end to end: build the encoders, decode, encode, write a fresh
             store, aggregates with the run's codebook, every fold model of every base model, the
             stacker and the reweighting, write the CSV.
Prints seconds per video of each and the ratio; the difference is what the tool adds to the encoders.
"""
import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import bare_forward_seconds  # noqa: E402
from features.annotations import annotations_path, read_annotations  # noqa: E402
from features.categories import load_category_map  # noqa: E402
from features.encoders import build_frame_encoder, build_text_encoder  # noqa: E402
from inference.predict import extract_options, predict  # noqa: E402
from stacking.rundir import read_run_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="demo_out", help="output directory of `python run.py demo`")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = Path(args.demo)
    data, run_dir, stack_dir = demo / "data", demo / "run", demo / "stack"
    cmap = data / "category_map.csv"
    opts = extract_options(read_run_config(run_dir), str(cmap))
    videos = read_annotations(annotations_path(data, args.split), load_category_map(cmap))
    n = len(videos)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        predict(data, args.split, run_dir, stack_dir, Path(tmp) / "pred.csv", Path(tmp) / "cache", str(cmap))
        end_to_end = time.perf_counter() - start
    frame_encoder = build_frame_encoder(opts.frame_encoder, "cpu")
    text_encoder = build_text_encoder(opts.text_encoder, "cpu")
    bare = bare_forward_seconds(data, args.split, videos, opts, frame_encoder, text_encoder)
    print(f"{n} videos of {data}/{args.split}, <= {opts.frames} frames each, torch threads {args.threads}")
    print(f"encoder forward alone : {1000 * bare / n:8.1f} ms/video ({bare:.1f} s)")
    print(f"predict end to end    : {1000 * end_to_end / n:8.1f} ms/video ({end_to_end:.1f} s, "
          "encoders loaded inside)")
    print(f"ratio predict / encoder forward: {end_to_end / bare:.2f}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("reproduce: PYTHONPATH=. python bench/bench_predict.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
