"""train-neural at 1 and 2 processes (torchrun) on a generated store: wall time, speed-up, peak RSS per rank,
and whether the outputs are equal, side by side from one run.

Rows: 1 process with --threads 1, torchrun --nproc-per-node 2 (each rank its share of the cores,
World.cpu_threads(): 1 on 2 cores), and with --default-threads 1 process with torch's default threads (all
the cores; on a loaded machine this oversubscribes it badly, hence opt-in). The 2-process run is compared bit
for bit with the 1-process run at 1 thread (torch's CPU results change in the last bits with the thread
count, so only equal thread counts can be equal).

    python -m bench distributed_train --n 2000 --folds 5 --epochs 2 --models mlp,linear,vlad
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from bench.common import REPO as ROOT, Table, cache_dir, child_env, write_record

BENCHMARK = {"kind": "speed", "summary": "train-neural at 1 and 2 processes (torchrun): wall, speed-up, peak RSS per rank, equal outputs"}


def make_cache(folder, n, n_classes, frames, frame_dim, text_dim, tokens):
    """labeled.h5 of n synthetic videos over n_classes, with aggregates and a codebook (for vlad and mlp)."""
    from features.aggregates import run_aggregates
    from demo.synthetic_store import write_synthetic_store
    write_synthetic_store(folder, n, frames, frame_dim, tokens, text_dim, signal=0.5, n_classes=n_classes)
    run_aggregates(folder, ["labeled"])


def rank_pids(pid):
    """{rank: pid} of the processes running train-neural: torchrun's workers (RANK in their environment),
    or `pid` itself as rank 0 when it runs alone."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            env = dict(e.split(b"=", 1) for e in Path(f"/proc/{p}/environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"RANK" in env and b"LOCAL_RANK" in env:
            found[int(env[b"RANK"])] = p
    return found or {0: pid}


def peak_rss_mb(pid):
    """VmHWM (peak resident memory) of a live process, MB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def timed_run(argv, log):
    """Run argv, polling each rank's peak RSS. -> (wall seconds, {rank: peak RSS MB})."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        peaks = {}
        while proc.poll() is None:
            for rank, pid in rank_pids(proc.pid).items():
                mb = peak_rss_mb(pid)
                if mb is not None:
                    peaks[rank] = max(peaks.get(rank, 0.0), mb)
            time.sleep(0.2)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n" + Path(log).read_text()[-3000:])
    return seconds, peaks


def same_outputs(run_a, run_b, models):
    """Every model's oof_proba equal bit for bit in both run directories."""
    for model in models:
        with h5py.File(Path(run_a) / model / "predictions.h5", "r") as a, \
                h5py.File(Path(run_b) / model / "predictions.h5", "r") as b:
            if not np.array_equal(a["oof_proba"][:], b["oof_proba"][:]):
                return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench distributed_train", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="generated labelled videos")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--frame-dim", type=int, default=128)
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--models", default="mlp,linear,vlad")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--default-threads", action="store_true",
                   help="also time 1 process with torch's default threads (all the cores)")
    p.add_argument("--dir", help="keep the store and runs here (default: a temporary directory in BENCH_CACHE)")
    args = p.parse_args(argv)
    cache_dir().mkdir(parents=True, exist_ok=True)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="distributed_train_", dir=cache_dir()))
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "cache"
    if not (cache / "labeled.h5").exists():
        cache.mkdir(exist_ok=True)
        make_cache(cache, args.n, args.classes, args.frames, args.frame_dim, args.text_dim, args.tokens)
    base = [str(ROOT / "run.py"), "train-neural", "--cache", str(cache), "--models", args.models,
            "--folds", str(args.folds), "--epochs", str(args.epochs), "--overwrite"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    setups = [("1 process, --threads 1", [sys.executable], ["--threads", "1"]),
              ("torchrun 2 processes (1 thread each)", torchrun, [])]
    if args.default_threads:        # on a loaded machine torch's threads oversubscribe it badly: opt-in
        setups.append(("1 process, torch default threads", [sys.executable], []))
    table = Table(f"train-neural, {args.n:,} synthetic videos ({args.classes} classes, F={args.frames} x "
                  f"D={args.frame_dim}, T={args.tokens} x Dt={args.text_dim}), models {args.models}, {args.folds} folds, "
                  f"{args.epochs} epochs", ["run", "wall s", "speed-up vs 1 process at 1 thread", "peak RSS MB per rank"])
    walls, runs = [], []
    for i, (name, launcher, extra) in enumerate(setups):
        run = folder / f"run{i}"
        seconds, peaks = timed_run(launcher + base + ["--out", str(run)] + extra, folder / f"run{i}.log")
        walls.append(seconds)
        runs.append(run)
        rss = ", ".join(f"rank {r}: {mb:.0f}" for r, mb in sorted(peaks.items()))
        table.add(name, f"{seconds:.1f}", f"{walls[0] / seconds:.2f}x", rss)
    models = args.models.split(",")
    note = (f"2 processes equal 1 process at 1 thread, oof_proba bit for bit: {same_outputs(runs[0], runs[1], models)}"
            + (f"; equal 1 process at default threads: {same_outputs(runs[2], runs[1], models)}" if args.default_threads
               else "") + f"; load average {os.getloadavg()[0]:.1f} at the end")
    print(note)
    write_record("distributed_train", argv, [table], {"speed-up, 2 processes / 1 at 1 thread": walls[0] / walls[1]}, [note])
    if not args.dir:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
