"""`predict` latency per video against the encoder forward alone, on the same videos.

    python -m bench predict --demo demo_out [--split test]

Takes a finished `python run.py demo --out DIR` (DIR/data, DIR/run, DIR/stack), packages DIR/stack/model
when the demo did not (inference.package.package_model with DIR/data/category_map.csv), and labels
DIR/data's split twice, side by side in one process, reading only the model directory:
    bare     the frozen encoders' forward pass alone (frames, text fields, joined tokens) on inputs
             decoded and tokenised beforehand (bench.extract's measure), the run's extract options;
    predict  inference.predict.predict end to end: verify the model directory (sha256 of every file),
             build the encoders, decode, encode, write a fresh store, aggregates with the model's
             codebook, every fold model of every base model, the stacker and the reweighting, the CSV.
Prints seconds per video of each and the ratio; the difference is what the tool adds to the encoders.
`--profile N` also prints predict's N most expensive functions (cumulative time, cProfile).
"""
import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

import torch

from core.device import keep_freed_memory_mapped
from bench.common import Table, measured, peak_rss_mib, write_record
from bench.extract import bare_forward_seconds
from features.annotations import annotations_path, read_annotations
from features.categories import load_category_map
from features.encoders import build_frame_encoder, build_text_encoder
from inference.model_dir import open_model_dir
from inference.package import package_model
from inference.predict import extract_options, predict, source_kind

BENCHMARK = {"kind": "speed", "summary": "predict from a model directory, ms per video against the encoder forward alone (target <= 1.1)"}


def model_dir_of(demo):
    """DEMO/stack/model, packaged from DEMO/run and DEMO/stack when the demo did not write it."""
    model_dir = demo / "stack" / "model"
    if not model_dir.exists():
        package_model(demo / "run", demo / "stack", model_dir, category_map=demo / "data" / "category_map.csv")
    return model_dir


def timed_predict(data, split, model_dir, profile):
    """Seconds of one predict end to end (its own fresh cache), and the profiler when asked."""
    profiler = cProfile.Profile() if profile else None
    with tempfile.TemporaryDirectory() as tmp, measured() as m:
        if profiler:
            profiler.enable()
        predict(data, split, model_dir, Path(tmp) / "pred.csv", Path(tmp) / "cache")
        if profiler:
            profiler.disable()
    return m.wall_s, profiler


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench predict", description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="demo_out", help="output directory of `python run.py demo`")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, help="print predict's N costliest functions")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    demo = Path(args.demo)
    data, model_dir = demo / "data", model_dir_of(demo)
    model = open_model_dir(model_dir)
    opts = extract_options(model, source_kind(data, args.split, model.model_json))
    videos = read_annotations(annotations_path(data, args.split), load_category_map(model.category_map_path))
    n = len(videos)
    keep_freed_memory_mapped()       # as extract does on the CPU, for both passes alike
    # the bare pass first: it pays the one-off imports (transformers alone took ~8 s cold), which are
    # per process, not per video; predict still builds its encoders (weights read, sha256) inside
    frame_encoder = build_frame_encoder(opts.frame_encoder, "cpu", opts.precision, opts.runtime)   # predict's own
    text_encoder = build_text_encoder(opts.text_encoder, "cpu", opts.precision, opts.runtime)     # runtime (model.json)
    bare = bare_forward_seconds(data, args.split, videos, opts, frame_encoder, text_encoder)
    end_to_end, profiler = timed_predict(data, args.split, model_dir, args.profile)
    table = Table(f"{n} videos of the demo's {args.split} split, <= {opts.frames} frames each, encoders on "
                  f"{frame_encoder.runtime}, threads {args.threads}, from the model directory alone",
                  ["pass", "ms per video", "seconds"])
    table.add("encoder forward alone (inputs decoded beforehand)", f"{1000 * bare / n:.1f}", f"{bare:.1f}")
    table.add("predict end to end (encoders loaded inside)", f"{1000 * end_to_end / n:.1f}", f"{end_to_end:.1f}")
    print(f"ratio predict / encoder forward: {end_to_end / bare:.2f} (target <= 1.1); peak RSS {peak_rss_mib():.0f} MiB")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    write_record("predict", argv, [table], {"predict / encoder forward (target <= 1.1)": end_to_end / bare},
                 [f"peak RSS {peak_rss_mib():,.0f} MiB (both passes, one process)"], variant=args.split)


if __name__ == "__main__":
    main()
