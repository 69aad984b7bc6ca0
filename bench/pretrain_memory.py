"""Pretraining's memory and speed with its masked positions padded to a few sizes (neural.pretrain's
POSITION_BUCKET, what the product does) against unpadded (a new size every step), side by side in one run.

    python -m bench pretrain_memory --n 10000 --epochs 1 [--root bench_cache/pretrain_memory]

Writes ROOT/cache/labeled.h5 once (demo.synthetic_store: random features of the extract's
shapes), then runs `run.py train-neural --models single --pretrain --pretrain-epochs E --epochs 1 --folds 3`
per arm, alternating padded / unpadded `--repeats` times, each a child process stopped once
pretraining's record (pretrain/single.json) is written. Per run: wall seconds to that point,
pretraining's own seconds per epoch (its record) and the child's peak RSS (os.wait4). The unpadded arm is
the same command with neural.pretrain.POSITION_BUCKET set to 1 before run.py starts: the masked-modelling
tensors then take the batch's own number of masked positions, as before the padding (same losses).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from bench.common import REPO, Table, cache_dir, child_env, run_child, write_record
from demo.synthetic_store import write_synthetic_store

BENCHMARK = {"kind": "speed", "summary": "pretraining's peak RSS and time, masked positions padded (the product) vs unpadded"}

UNPADDED = ("import sys, runpy; import neural.pretrain as pretrain; pretrain.POSITION_BUCKET = 1; "
            "sys.argv = ['run.py'] + sys.argv[1:]; runpy.run_path(%r, run_name='__main__')" % str(REPO / "run.py"))
ARMS = ("padded", "unpadded")


def command(arm, cache, out, epochs, threads):
    head = [sys.executable, str(REPO / "run.py")] if arm == "padded" else [sys.executable, "-c", UNPADDED]
    return head + ["train-neural", "--cache", str(cache), "--out", str(out), "--models", "single", "--pretrain",
                   "--pretrain-epochs", str(epochs), "--epochs", "1", "--folds", "3", "--threads", str(threads)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench pretrain_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="videos in the synthetic store")
    parser.add_argument("--epochs", type=int, default=1, help="pretraining epochs per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per arm, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default=None, help="store and runs [default: BENCH_CACHE/pretrain_memory]")
    args = parser.parse_args(argv)
    root = Path(args.root or cache_dir("pretrain_memory"))
    cache = root / "cache"
    if not (cache / "labeled.h5").exists():
        write_synthetic_store(cache, args.n)
    env = child_env(args.threads)
    results = {arm: [] for arm in ARMS}
    for i in range(args.repeats):
        for arm in ARMS:
            out = root / f"run_{arm}_{i}"
            shutil.rmtree(out, ignore_errors=True)
            record = out / "pretrain" / "single.json"
            m = run_child(command(arm, cache, out, args.epochs, args.threads), env, root / f"{arm}_{i}.log",
                          stop_when=record)
            seconds, peak = m.wall_s, m.peak_rss_mib
            epoch_s = json.loads(record.read_text())["seconds_per_epoch"]
            results[arm].append({"seconds": seconds, "peak_mib": peak, "epoch_seconds": epoch_s})
            print(f"{arm} #{i}: {seconds:.0f} s to the record, epochs {', '.join(f'{s:.0f}' for s in epoch_s)} s, "
                  f"peak RSS {peak:.0f} MiB", flush=True)
    mean = {arm: {k: float(np.mean([r[k] if k != "epoch_seconds" else np.sum(r[k]) for r in runs]))
                  for k in ("seconds", "peak_mib", "epoch_seconds")} for arm, runs in results.items()}
    table = Table(f"N={args.n:,}, {args.epochs} pretraining epoch(s), {args.repeats} run(s) per arm (means)",
                  ["arm", "peak RSS MiB", "pretraining s (all epochs)", "s per 1k videos per epoch"])
    for arm, m in mean.items():
        table.add(arm, f"{m['peak_mib']:,.0f}", f"{m['epoch_seconds']:.0f}", f"{1000 * m['epoch_seconds'] / args.n / args.epochs:.2f}")
    ratios = {"padded / unpadded: peak RSS": mean["padded"]["peak_mib"] / mean["unpadded"]["peak_mib"],
              "padded / unpadded: pretraining time": mean["padded"]["epoch_seconds"] / mean["unpadded"]["epoch_seconds"]}
    (root / "results.json").write_text(json.dumps({"args": vars(args), "runs": results, "means": mean}, indent=1))
    write_record("pretrain_memory", argv, [table], ratios)


if __name__ == "__main__":
    main()
