"""extract at 1 and 2 processes (torchrun) on a generated preliminary-layout set, and stitch by copy vs VDS.

    python -m bench distributed_extract extract --n 10000 [--root bench_cache/distributed_extract]
    python -m bench distributed_extract stitch                                       # after `extract`

extract: generate N labelled videos (demo.synthetic.generate_feature_zip_dataset: float16 <id>.npy,
F<=32 x 768; reused when there), then run, one after the other from an empty cache each time,
    run.py extract --frames-from npy --max-tokens 32 --workers 0 --device cpu --batch-size 256
as one plain process and under `torchrun --standalone --nproc-per-node 2` (default aggregates: codebook
once, agg/* per shard), printing wall time, videos/s, the speed-up and each rank's peak RSS (VmHWM read
from /proc while it runs), and checking that both stores hold the same frame_emb and agg/netvlad.
stitch: cut the 1-process store into 256-row shards, then time stitching them by copy
(features.shards.stitch) and as an h5py Virtual Dataset, and a read of 2,048 random rows of frame_emb
through StoreReader from each.
"""
import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np

from core import schema
from core.hdf5 import create_dataset
from bench.common import REPO, Table, cache_dir, child_env, write_record
from features.shards import stitch
from features.store import StoreReader

BENCHMARK = {"kind": "speed", "summary": "extract at 1 and 2 processes (torchrun) and stitching shards by copy vs virtual dataset"}


def extract_argv(data, cache, nproc):
    run = [str(REPO / "run.py"), "extract", "--data", str(data), "--split", "labeled", "--out", str(cache),
           "--frames-from", "npy", "--frames", "32", "--max-tokens", "32", "--workers", "0", "--device", "cpu",
           "--batch-size", "256"]
    if nproc == 1:
        return [sys.executable, *run]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *run]


def _descendants(pid):
    children = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                children.setdefault(int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry.name))
        except (OSError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _peak_rss_by_rank(proc, peaks, stop):
    """Fill peaks {rank (or 'main'): MiB} with each python process's VmHWM until `stop` is set."""
    while not stop.is_set():
        for pid in _descendants(proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), None)
            key = f"rank {rank}" if rank is not None else ("process" if pid == proc.pid else None)
            hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0)
            if key:
                peaks[key] = max(peaks.get(key, 0), hwm / 1024)
        time.sleep(0.5)


def timed_extract(data, cache, nproc, env):
    shutil.rmtree(cache, ignore_errors=True)
    peaks, stop = {}, threading.Event()
    start = time.perf_counter()
    log = open(Path(cache).parent / f"extract_{nproc}.log", "w")
    proc = subprocess.Popen(extract_argv(data, cache, nproc), env=env, stdout=log, stderr=subprocess.STDOUT)
    watcher = threading.Thread(target=_peak_rss_by_rank, args=(proc, peaks, stop), daemon=True)
    watcher.start()
    code = proc.wait()
    seconds = time.perf_counter() - start
    stop.set()
    watcher.join()
    if code:
        raise SystemExit(f"extract at {nproc} process(es) failed (exit {code}); see {log.name}")
    if nproc > 1:
        peaks.pop("process", None)             # torchrun's own agent
    return seconds, peaks


def run_extract(args, argv):
    from demo.synthetic import generate_feature_zip_dataset
    root = Path(args.root)
    data = root / f"n{args.n}"
    if not (data / "summary_labeled.json").exists():
        generate_feature_zip_dataset(data, args.n, n_frames=32, dim=768, split="labeled", progress=False)
    env = child_env(args.threads)
    table = Table(f"extract of {args.n:,} generated videos (F<=32 x 768 npy, MiniLM on 32 tokens, default aggregates)",
                  ["processes", "seconds", "videos/s", "peak RSS MiB", "load average after"])
    results = {}
    for nproc in (1, 2):
        seconds, peaks = timed_extract(data, root / f"cache{nproc}", nproc, env)
        results[nproc] = seconds
        table.add(nproc, f"{seconds:.1f}", f"{args.n / seconds:.1f}",
                  ", ".join(f"{k} {v:,.0f}" for k, v in sorted(peaks.items())), f"{os.getloadavg()[0]:.2f}")
    with h5py.File(root / "cache1/labeled.h5", "r") as one, h5py.File(root / "cache2/labeled.h5", "r") as two:
        same = all(np.array_equal(one[name][s:s + 1024], two[name][s:s + 1024])
                   for name in (schema.FRAME_EMB, "agg/netvlad") for s in range(0, args.n, 1024))
    note = f"frame_emb and agg/netvlad equal between the two stores: {same}"
    print(note)
    write_record("distributed_extract", argv, [table], {"speed-up, 2 / 1 processes": results[1] / results[2]}, [note],
                 variant="extract")


def cut_shards(store, folder, rows):
    """Copy rows of a store into shard stores of `rows` rows each (the layout ranks write)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    paths = []
    with h5py.File(store, "r") as src:
        n = len(src[schema.IDS])
        names = []
        src.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for i, s in enumerate(range(0, n, rows)):
            e = min(n, s + rows)
            paths.append(folder / f"labeled-{i:05d}.h5")
            with h5py.File(paths[-1], "w") as dst:
                for name in names:
                    if name in (schema.IDS, schema.LABEL_FINE, schema.LABEL_COARSE):
                        dst.create_dataset(name, data=src[name][s:e])
                    else:
                        create_dataset(dst, name, (e - s,) + src[name].shape[1:], src[name].dtype)
                        dst[name][:] = src[name][s:e]
                for key, value in src.attrs.items():
                    dst.attrs[key] = value
    return paths


def stitch_virtual(paths, out):
    """The VDS alternative: every dataset a virtual dataset mapping each shard's rows (sources by relative name)."""
    with h5py.File(paths[0], "r") as first:
        names = []
        first.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        specs = {name: (first[name].shape[1:], first[name].dtype) for name in names}
        attrs = dict(first.attrs)
    sizes = []
    for p in paths:
        with h5py.File(p, "r") as h5:
            sizes.append(len(h5[schema.IDS]))
    n = sum(sizes)
    with h5py.File(out, "w") as h5:
        for name, (shape, dtype) in specs.items():
            layout = h5py.VirtualLayout(shape=(n,) + shape, dtype=dtype)
            offset = 0
            for p, size in zip(paths, sizes):
                layout[offset:offset + size] = h5py.VirtualSource(os.path.relpath(p, out.parent), name,
                                                                  shape=(size,) + shape)
                offset += size
            h5.create_virtual_dataset(name, layout)
        for key, value in attrs.items():
            h5.attrs[key] = value


def random_read_seconds(path, rows):
    reader = StoreReader(path)
    start = time.perf_counter()
    frames = reader.read(schema.FRAME_EMB, rows)
    seconds = time.perf_counter() - start
    reader.close()
    return seconds, frames


def run_stitch(args, argv):
    root = Path(args.root)
    store = root / "cache1" / "labeled.h5"
    shards = cut_shards(store, root / "shards", 256)
    n = StoreReader(store).n
    table = Table(f"stitching {n:,} rows in {len(shards)} shards, then {min(n, 2048):,} random rows of frame_emb read",
                  ["method", "stitch s", "file MiB", "random read s", "equal to the store"])
    for label, build in (("copy", lambda out: stitch(shards, out, aggregates=True)),
                         ("virtual dataset", lambda out: stitch_virtual(shards, out))):
        out = root / f"stitched_{label.split()[0]}.h5"
        start = time.perf_counter()
        build(out)
        built = time.perf_counter() - start
        rows = np.random.default_rng(0).choice(n, min(n, 2048), replace=False)
        read, frames = random_read_seconds(out, rows)
        _, want = random_read_seconds(store, rows)
        table.add(label, f"{built:.2f}", f"{os.path.getsize(out) / 2**20:,.0f}", f"{read:.3f}",
                  str(np.array_equal(frames, want)))
    write_record("distributed_extract", argv, [table], variant="stitch")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench distributed_extract", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["extract", "stitch"])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--root", default=None, help="[default: BENCH_CACHE/distributed_extract]")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the 1-process run "
                        "(a rank on the CPU sets its own share of the cores)")
    args = parser.parse_args(argv)
    args.root = args.root or str(cache_dir("distributed_extract"))
    (run_extract if args.what == "extract" else run_stitch)(args, argv)


if __name__ == "__main__":
    main()
