"""How cost grows with N: a generated preliminary-layout dataset through the whole pipeline at several sizes.

    PYTHONPATH=. python bench/bench_scale.py --sizes 10000,30000,100000 --root /tmp/scale

For each size N: generate N labelled videos (demo.synthetic.generate_feature_zip_dataset: one zip of
float16 <id>.npy frames, F<=32 x 768, 200 classes), then run each stage as its own subprocess, exactly
as a user would type it:
    extract     run.py extract --frames-from npy --max-tokens 32 --no-aggregates  (MiniLM on the text)
    aggregates  features.aggregates.run_aggregates (codebook fit + agg/* for every video)
    neural      run.py train-neural --models mlp --epochs 1 --folds 3
    stack       run.py stack --split '' --compare ''  (3 folds: the fewest its nested reweighting allows)
and records its wall time and its peak resident memory (os.wait4's rusage of that child, so each
stage is measured alone). Every stage starts from scratch (cache/, run/, stack/ are removed first);
the generated data is reused when it is already there. Threads: --threads for torch, BLAS and LightGBM.
Results are appended to ROOT/results.jsonl as each stage ends (a killed run keeps what it measured),
and the table printed at the end covers every size in that file (--report prints it alone).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("generate", "extract", "aggregates", "neural", "stack")


def stage_commands(folder, n, args):
    """{stage: argv} for one size; every stage reads what the one before wrote."""
    py, run = sys.executable, str(REPO / "run.py")
    cache, run_dir, stack_dir = folder / "cache", folder / "run", folder / "stack"
    generate = ("from demo.synthetic import generate_feature_zip_dataset as g; "
                f"g({str(folder)!r}, {n}, n_frames={args.frames}, dim={args.dim}, split='labeled', progress=False)")
    aggregates = ("import torch; torch.set_num_threads(%d); from features.aggregates import run_aggregates; "
                  "run_aggregates(%r, ['labeled'], overwrite=True)" % (args.threads, str(cache)))
    return {
        "generate": [py, "-c", generate],
        "extract": [py, run, "extract", "--data", str(folder), "--split", "labeled", "--out", str(cache),
                    "--frames-from", "npy", "--frames", str(args.frames), "--max-tokens", str(args.max_tokens),
                    "--workers", "0", "--device", "cpu", "--batch-size", "256", "--no-aggregates"],
        "aggregates": [py, "-c", aggregates],
        "neural": [py, run, "train-neural", "--cache", str(cache), "--out", str(run_dir), "--models", "mlp",
                   "--epochs", "1", "--folds", "3", "--threads", str(args.threads)],
        "stack": [py, run, "stack", "--model", str(run_dir), "--out", str(stack_dir), "--split", "",
                  "--compare", "", "--threads", str(args.threads)],
    }


def measure(argv, env, log):
    """(wall seconds, peak RSS MiB) of one child process; its output goes to `log`."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code:
        tail = Path(log).read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"stage failed (exit {code}); see {log}:\n" + "\n".join(tail))
    return seconds, usage.ru_maxrss / 1024          # Linux reports KiB


def run_size(n, args, env):
    folder = Path(args.root) / f"n{n}"
    have_data = (folder / "summary_labeled.json").exists() and \
        json.loads((folder / "summary_labeled.json").read_text())["n_videos"] == n
    for stage, sub in (("extract", "cache"), ("neural", "run"), ("stack", "stack")):
        if stage in args.stages:          # a stage starts from scratch; the ones before it are reused
            shutil.rmtree(folder / sub, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    for stage, argv in stage_commands(folder, n, args).items():
        if (stage == "generate" and have_data) or stage not in args.stages:
            continue
        print(f"N={n:,} {stage} ...", flush=True)
        seconds, peak = measure(argv, env, folder / f"{stage}.log")
        record = {"n": n, "stage": stage, "seconds": round(seconds, 1), "peak_rss_mib": round(peak),
                  "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "command": " ".join(argv)}
        if stage == "extract":
            record["store_gib"] = round((folder / "cache" / "labeled.h5").stat().st_size / 2**30, 2)
        print(f"N={n:,} {stage}: {seconds:.1f} s, peak RSS {peak:.0f} MiB", flush=True)
        with open(Path(args.root) / "results.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")


def latest_records(root):
    """{(n, stage): the last record of it} from ROOT/results.jsonl."""
    out = {}
    path = Path(root) / "results.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out[(r["n"], r["stage"])] = r
    return out


def report(root):
    records = latest_records(root)
    sizes = sorted({n for n, _ in records})
    if not sizes:
        print(f"no results in {root}/results.jsonl yet")
        return
    print("| stage | " + " | ".join(f"N={n:,}: s (s per 1k videos), peak MiB" for n in sizes)
          + f" | time ratio N={sizes[-1]:,} / N={sizes[0]:,} (N ratio {sizes[-1] / sizes[0]:.1f}) |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for stage in STAGES:
        cells, first, last = [], None, None
        for n in sizes:
            r = records.get((n, stage))
            if r is None:
                cells.append("not run")
                continue
            cells.append(f"{r['seconds']:.0f} ({1000 * r['seconds'] / n:.2f}), {r['peak_rss_mib']} [{r['threads']}t]")
            first = first or r
            last = r
        ratio = f"{last['seconds'] / first['seconds']:.1f}" if first and last is not first else "-"
        print(f"| {stage} | " + " | ".join(cells) + f" | {ratio} |")
    stores = {n: records[(n, "extract")].get("store_gib") for n in sizes if (n, "extract") in records}
    print("[kt]: the stage ran with k threads")
    print("store size (GiB): " + ", ".join(f"N={n:,}: {g}" for n, g in stores.items()))
    print(f"source: {root}/results.jsonl; each stage's command is recorded there")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,30000,100000", help="comma-separated numbers of videos")
    parser.add_argument("--root", default="/tmp/scale", help="where each size's data and outputs go (~9 GB at 100k)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=32, help="most frames per video (F)")
    parser.add_argument("--dim", type=int, default=768, help="frame feature dimension (D)")
    parser.add_argument("--max-tokens", type=int, default=32, help="text tokens kept (bounds the token store)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="stages to (re)run; the outputs of the others are reused from ROOT")
    parser.add_argument("--report", action="store_true", help="only print the table of ROOT/results.jsonl")
    args = parser.parse_args(argv)
    args.stages = tuple(s for s in args.stages.split(",") if s)
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    print(f"command: PYTHONPATH=. python {' '.join(sys.argv)}", flush=True)
    if not args.report:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
        for n in (int(s) for s in args.sizes.split(",")):
            run_size(n, args, env)
    report(args.root)


if __name__ == "__main__":
    main()
