"""Speed and memory of computing every agg/* feature, side by side with merely reading the frames.

Generates a store of N videos x F frames x D float16 (default 100k x 32 x 768, the preliminary layout;
4.9 GB) in chunks under --workdir, then, each phase in a fresh process so each peak RSS is its own:
    read       read frame_emb and frame_mask in row batches, nothing else        (videos/s)
    codebook   fit the codebook on a sample of frames (PCA, k-means, GMM)       (seconds)
    aggregate  run_aggregates with that codebook: read, compute, write agg/*    (videos/s)
    read       again, to show the page cache's effect on the first read
and prints the throughputs, their ratio and each phase's peak RSS (bench.common.peak_rss_mib).

    python -m bench aggregates --n 20000 --threads 1
"""
import argparse
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from bench.common import Table, cache_dir, limit_threads, peak_rss_mib as _peak_mb, write_record

BENCHMARK = {"kind": "speed", "summary": "computing every agg/* feature against a plain read of the frames (videos/s, peak RSS)"}


def generate(path, n, n_frames, dim, chunk, seed):
    """Clustered random frames, 1..F valid per video, 1 % of videos with none (media faults)."""
    import numpy as np
    from core import schema
    from features.categories import load_category_map
    from features.store import StoreDims, StoreWriter, create_store
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32) * 2
    create_store(path, "bench", [f"v{i:07d}" for i in range(n)], np.full(n, -1), np.full(n, -1),
                 StoreDims(n_frames, dim, 4, 1), {"bench": True}, load_category_map())
    writer = StoreWriter(path)
    for start in tqdm(range(0, n, chunk), desc="generate", unit="chunk"):
        b = min(chunk, n - start)
        n_valid = rng.integers(1, n_frames + 1, size=b) * (rng.random(b) > 0.01)
        mask = np.arange(n_frames)[None] < n_valid[:, None]                         # (b, F)
        frames = centres[rng.integers(64, size=(b, n_frames))]                      # (b, F, D)
        frames += rng.standard_normal(size=frames.shape, dtype=np.float32)
        writer.write_rows(start, {schema.FRAME_EMB: (frames * mask[..., None]).astype(np.float16),
                                  schema.FRAME_MASK: mask})
    writer.mark_complete()
    writer.close()
    return {"peak_mb": _peak_mb()}


def read_pass(path, batch_size, threads):
    import h5py
    import torch                      # imported so the RSS baseline matches the aggregate phase
    from core import schema
    torch.set_num_threads(threads)
    base = _peak_mb()
    t0 = time.perf_counter()
    with h5py.File(path, "r") as h5:
        n = len(h5[schema.FRAME_MASK])
        for start in range(0, n, batch_size):
            h5[schema.FRAME_EMB][start:start + batch_size]
            h5[schema.FRAME_MASK][start:start + batch_size]
    seconds = time.perf_counter() - t0
    return {"videos_per_s": n / seconds, "seconds": seconds, "peak_mb": _peak_mb(), "import_mb": base}


def codebook_pass(workdir, options_kw, threads):
    import torch
    from features.aggregates import AggregateOptions
    from features.codebook import CODEBOOK_FILE, fit_codebook
    from core.schema import store_path
    torch.set_num_threads(threads)
    base = _peak_mb()
    t0 = time.perf_counter()
    codebook = fit_codebook([store_path(workdir, "bench")], AggregateOptions(**options_kw))
    codebook.save(Path(workdir) / CODEBOOK_FILE)
    return {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(), "import_mb": base}


def aggregate_pass(workdir, options_kw, threads, device):
    import torch
    from features.aggregates import AggregateOptions, run_aggregates
    torch.set_num_threads(threads)
    base = _peak_mb()
    t0 = time.perf_counter()
    report = run_aggregates(workdir, ["bench"], AggregateOptions(**options_kw), device=device)["bench"]
    seconds = time.perf_counter() - t0
    return {"videos_per_s": report["rows"] / seconds, "seconds": seconds, "peak_mb": _peak_mb(),
            "import_mb": base, "total_width": report["total_width"], "widths": report["widths"]}


def _in_child(fn, *args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench aggregates", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="videos to generate")
    parser.add_argument("--frames", type=int, default=32, help="F, frames per video")
    parser.add_argument("--dim", type=int, default=768, help="D, frame embedding dim")
    parser.add_argument("--workdir", default=None, help="where the temporary store is made [default: BENCH_CACHE]")
    parser.add_argument("--batch-size", type=int, default=256, help="videos per read/compute batch")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--keep", action="store_true", help="keep the generated store afterwards")
    args = parser.parse_args(argv)
    limit_threads(args.threads)
    workdir = Path(args.workdir or cache_dir()) / f"bench_aggregates_{args.n}_{os.getpid()}"
    workdir.mkdir(parents=True)
    path = workdir / "bench.h5"
    options_kw = {"batch_size": args.batch_size}
    try:
        t0 = time.perf_counter()
        gen = _in_child(generate, path, args.n, args.frames, args.dim, 1000, 0)
        print(f"generated {args.n} x {args.frames} x {args.dim} float16 "
              f"({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
        read1 = _in_child(read_pass, path, args.batch_size, args.threads)
        fit = _in_child(codebook_pass, workdir, options_kw, args.threads)
        aggregate = _in_child(aggregate_pass, workdir, options_kw, args.threads, args.device)
        read2 = _in_child(read_pass, path, args.batch_size, args.threads)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    _report(args, argv, gen, read1, fit, aggregate, read2)


def _report(args, argv, gen, read1, fit, aggregate, read2):
    read_best = max(read1["videos_per_s"], read2["videos_per_s"])
    table = Table(f"{args.n:,} videos, {args.frames} x {args.dim} float16 frames, batch {args.batch_size}, "
                  f"{args.threads} thread(s), device {args.device}; each phase its own process",
                  ["phase", "videos/s", "seconds", "peak RSS MB (after imports)"])
    table.add("read frames only (first pass)", f"{read1['videos_per_s']:,.0f}", f"{read1['seconds']:.1f}",
              f"{read1['peak_mb']:.0f} ({read1['import_mb']:.0f})")
    table.add("read frames only (again: page cache)", f"{read2['videos_per_s']:,.0f}", f"{read2['seconds']:.1f}",
              f"{read2['peak_mb']:.0f} ({read2['import_mb']:.0f})")
    table.add("fit the codebook (once)", "", f"{fit['seconds']:.1f}", f"{fit['peak_mb']:.0f} ({fit['import_mb']:.0f})")
    table.add("compute + write agg/*", f"{aggregate['videos_per_s']:,.0f}", f"{aggregate['seconds']:.1f}",
              f"{aggregate['peak_mb']:.0f} ({aggregate['import_mb']:.0f})")
    ratios = {"aggregate / the faster read": aggregate["videos_per_s"] / read_best,
              "aggregate / the first read": aggregate["videos_per_s"] / read1["videos_per_s"]}
    notes = [f"agg width per video: {aggregate['total_width']:,} float16 values {aggregate['widths']}",
             f"generating the store: peak RSS {gen['peak_mb']:.0f} MB"]
    print("\n".join(notes))
    write_record("aggregates", argv, [table], ratios, notes)


if __name__ == "__main__":
    main()
