"""The demo's extract stage per encoder runtime: `run.py extract` on the same generated demo data, runtimes
alternated run by run, wall clock of the whole command (start-up, every split, the codebook and agg/*).

    python -m bench demo_extract [--data DIR] [--runtimes torch,onnx] [--rounds 2] [--limit N]

--data: demo data (zip frames) as `python run.py demo` or demo.synthetic.generate_demo_dataset writes it;
without it the demo's default size (`small`: 672 videos of 3-4 frames at 64 px) is generated under
BENCH_CACHE/demo_extract/data. The extract options are the demo's (demo/run.py DemoOptions: 4 frames,
64 tokens, 1 worker, 1 thread, PCA 32, 8 clusters, 4 GMM components). Target (issue 24): the default
runtime halves the stage's time against torch.
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import time

from bench.common import REPO, Table, cache_dir, write_record

BENCHMARK = {"kind": "speed", "summary": "the demo's extract stage (run.py extract, every split, aggregates) per encoder runtime, alternated"}


def demo_data(path):
    """The demo's `small` data at `path`, generated unless it is there."""
    if not (path / "annotations").is_dir():
        from demo.run import DemoOptions
        from demo.synthetic import generate_demo_dataset
        o = DemoOptions.small()
        generate_demo_dataset(path, n_labelled=o.n_labelled, n_unlabelled=o.n_unlabelled, n_test=o.n_test,
                              n_frames=o.n_frames, image_size=o.image_size, seed=o.seed, tail_ratio=o.tail_ratio,
                              n_folds=o.n_folds, progress=False)
    return path


def extract_command(data, out, runtime, limit):
    """`run.py extract` with the demo's options (DemoOptions.small) on `runtime`."""
    from demo.run import DemoOptions
    o = DemoOptions.small()
    cmd = [sys.executable, str(REPO / "run.py"), "extract", "--data", str(data), "--out", str(out),
           "--category-map", str(data / "category_map.csv"), "--runtime", runtime, "--threads", str(o.threads),
           "--workers", str(o.workers), "--frames", str(o.frames),
           "--max-tokens", str(o.max_tokens), "--pca-dim", str(o.pca_dim), "--clusters", str(o.n_clusters),
           "--gmm-components", str(o.n_gmm)]
    return cmd + (["--limit", str(limit)] if limit else [])


def timed_run(cmd, out):
    """Wall seconds of `cmd` in a fresh output directory; its last lines name the failure."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return wall


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench demo_extract", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="demo data [default: generated under BENCH_CACHE]")
    parser.add_argument("--runtimes", default="torch,onnx")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="only the first N videos of each split (0: all)")
    args = parser.parse_args(argv)
    from pathlib import Path
    data = Path(args.data) if args.data else demo_data(cache_dir("demo_extract", "data"))
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    walls = {r: [] for r in runtimes}
    for _ in range(args.rounds):
        for runtime in runtimes:
            walls[runtime].append(timed_run(extract_command(data, cache_dir("demo_extract", runtime), runtime,
                                                            args.limit), cache_dir("demo_extract", runtime)))
            print(f"{runtime}: {walls[runtime][-1]:.1f} s", flush=True)
    table = Table(f"`run.py extract` on the demo's generated data ({data.name}; every split"
                  f"{f', first {args.limit} videos of each' if args.limit else ''}), the demo's options, "
                  f"runtimes alternated over {args.rounds} round(s)",
                  ["runtime", "seconds per run", "median s", f"{runtimes[0]} / this (median)"])
    base = statistics.median(walls[runtimes[0]])
    for runtime in runtimes:
        med = statistics.median(walls[runtime])
        table.add(runtime, ", ".join(f"{w:.1f}" for w in walls[runtime]), f"{med:.1f}", f"{base / med:.2f}")
    write_record("demo_extract", argv, [table],
                 {f"demo extract stage, {runtimes[0]} / {r}": base / statistics.median(walls[r]) for r in runtimes[1:]},
                 ["whole-command wall clock: process start, model load (and the ONNX export's cache hit), every "
                  "split, the codebook and agg/*; target: the default runtime halves it (>= 2.0)"])


if __name__ == "__main__":
    main()
