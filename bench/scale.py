"""How cost grows with N: a generated preliminary-layout dataset through the whole pipeline at several sizes.

    python -m bench scale --sizes 10000,30000,100000 [--root bench_cache/scale]

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

Two more stages, not in the default list (name them in --stages):
    pretrain    run.py train-neural --models single --pretrain --pretrain-epochs 1 --epochs 1 --folds 3,
                stopped as soon as pretrain/single.json is written (the record neural/pretrain.py writes
                last), so it measures pretraining (1 epoch over the store) and the set-up before it, not
                the fine-tuning folds; the record's seconds_per_epoch is kept as pretrain_epoch_seconds
    knn         run.py train-neural --models knn --folds 3 (PCA + bank per fold, blocked search, predicting)

    python -m bench scale --store synthetic --sizes 10000,30000,100000

--store synthetic replaces generate + extract (MiniLM: ~18 s per 1k videos on 2 CPU cores) by the stage
`synthetic`: ROOT/n<N>/cache/labeled.h5 written by demo.synthetic_store, with random but well-formed features of the extract's shapes (frames F x D float16 with
a frame mask, pooled text 3 x 384 and text token states T x 384 float16 with their masks, labels over
the 200 classes of the challenge's map with the generator's Zipf long tail). Its features mean nothing:
it measures cost only (time and memory of the stages that read the store), never a score. With it the
default stages are synthetic, pretrain, knn.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench.common import REPO, Table, cache_dir, child_env, run_child, write_record

BENCHMARK = {"kind": "speed", "summary": "cost against N: each pipeline stage's wall time and peak RSS at 10k-100k videos"}
STAGES = ("generate", "extract", "aggregates", "neural", "stack")          # the default list
SYNTHETIC_STAGES = ("synthetic", "pretrain", "knn")                         # the default with --store synthetic
ALL_STAGES = ("generate", "extract", "synthetic", "aggregates", "neural", "pretrain", "knn", "stack")
STAGE_DIRS = {"extract": "cache", "synthetic": "cache", "neural": "run", "pretrain": "run_pretrain",
              "knn": "run_knn", "stack": "stack"}      # what each stage writes; removed before it runs


def stage_commands(folder, n, args):
    """{stage: argv} for one size; every stage reads what the one before wrote."""
    py, run = sys.executable, str(REPO / "run.py")
    cache, run_dir, stack_dir = folder / "cache", folder / "run", folder / "stack"
    generate = ("from demo.synthetic import generate_feature_zip_dataset as g; "
                f"g({str(folder)!r}, {n}, n_frames={args.frames}, dim={args.dim}, split='labeled', progress=False)")
    synthetic = ("from demo.synthetic_store import write_synthetic_store as w; "
                 "w(%r, %d, n_frames=%d, frame_dim=%d, n_tokens=%d)" % (str(cache), n, args.frames, args.dim, args.max_tokens))
    aggregates = ("import torch; torch.set_num_threads(%d); from features.aggregates import run_aggregates; "
                  "run_aggregates(%r, ['labeled'], overwrite=True)" % (args.threads, str(cache)))
    return {
        "generate": [py, "-c", generate],
        "extract": [py, run, "extract", "--data", str(folder), "--split", "labeled", "--out", str(cache),
                    "--frames-from", "npy", "--frames", str(args.frames), "--max-tokens", str(args.max_tokens),
                    "--workers", "0", "--device", "cpu", "--batch-size", "256", "--no-aggregates"],
        "synthetic": [py, "-c", synthetic],
        "aggregates": [py, "-c", aggregates],
        "neural": [py, run, "train-neural", "--cache", str(cache), "--out", str(run_dir), "--models", "mlp",
                   "--epochs", "1", "--folds", "3", "--threads", str(args.threads)],
        "pretrain": [py, run, "train-neural", "--cache", str(cache), "--out", str(folder / "run_pretrain"),
                     "--models", "single", "--pretrain", "--pretrain-epochs", "1", "--epochs", "1", "--folds", "3",
                     "--threads", str(args.threads)],
        "knn": [py, run, "train-neural", "--cache", str(cache), "--out", str(folder / "run_knn"), "--models", "knn",
                "--folds", "3", "--threads", str(args.threads)],
        "stack": [py, run, "stack", "--model", str(run_dir), "--out", str(stack_dir), "--split", "",
                  "--compare", "", "--threads", str(args.threads)],
    }


def run_size(n, args, env):
    folder = Path(args.root) / f"n{n}"
    have_data = (folder / "summary_labeled.json").exists() and \
        json.loads((folder / "summary_labeled.json").read_text())["n_videos"] == n
    for stage, sub in STAGE_DIRS.items():
        if stage in args.stages:          # a stage starts from scratch; the ones before it are reused
            shutil.rmtree(folder / sub, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    for stage, argv in stage_commands(folder, n, args).items():
        if (stage == "generate" and have_data) or stage not in args.stages:
            continue
        print(f"N={n:,} {stage} ...", flush=True)
        pretrain_record = folder / "run_pretrain" / "pretrain" / "single.json"
        m = run_child(argv, env, folder / f"{stage}.log", stop_when=pretrain_record if stage == "pretrain" else None)
        seconds, peak = m.wall_s, m.peak_rss_mib
        record = {"n": n, "stage": stage, "seconds": round(seconds, 1), "peak_rss_mib": round(peak),
                  "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "load": round(os.getloadavg()[0], 2), "store": args.store, "command": " ".join(argv)}
        if stage in ("extract", "synthetic"):
            record["store_gib"] = round((folder / "cache" / "labeled.h5").stat().st_size / 2**30, 2)
        if stage == "pretrain":
            done = json.loads(pretrain_record.read_text())
            record["pretrain_epoch_seconds"] = round(sum(done["seconds_per_epoch"]), 1)
            record["stopped_after"] = "pretraining (pretrain/single.json written; the folds are not measured)"
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


def report(root, argv, store):
    """The table of every size in ROOT/results.jsonl, printed and written as this benchmark's record."""
    records = latest_records(root)
    sizes = sorted({n for n, _ in records})
    if not sizes:
        raise SystemExit(f"no results in {root}/results.jsonl yet")
    table = Table(f"Cost against N ({store} store; each stage its own process, 1 thread unless [kt])",
                  ["stage", *(f"N={n:,}: s (s per 1k videos), peak MiB" for n in sizes),
                   f"time ratio N={sizes[-1]:,} / N={sizes[0]:,} (N ratio {sizes[-1] / sizes[0]:.1f})"])
    ratios = {}
    for stage in (s for s in ALL_STAGES if any((n, s) in records for n in sizes)):
        cells, first, last = [], None, None
        for n in sizes:
            r = records.get((n, stage))
            if r is None:
                cells.append("not run")
                continue
            cell = f"{r['seconds']:.0f} ({1000 * r['seconds'] / n:.2f}), {r['peak_rss_mib']}"
            cell += f" [{r['threads']}t]" if r["threads"] != 1 else ""
            if "pretrain_epoch_seconds" in r:
                cell += f" (epoch alone {r['pretrain_epoch_seconds']:.0f} s, {1000 * r['pretrain_epoch_seconds'] / n:.2f})"
            cells.append(cell)
            first = first or r
            last = r
        if first and last is not first:
            ratios[f"{stage}: time N={sizes[-1]:,} / N={sizes[0]:,}"] = last["seconds"] / first["seconds"]
        table.add(stage, *cells, f"{last['seconds'] / first['seconds']:.1f}" if first and last is not first else "-")
    stores = {n: records[(n, s)].get("store_gib") for s in ("extract", "synthetic") for n in sizes if (n, s) in records}
    notes = ["store size (GiB): " + ", ".join(f"N={n:,}: {g}" for n, g in stores.items())] if stores else []
    write_record("scale", argv, [table], ratios, notes, variant=store)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,30000,100000", help="comma-separated numbers of videos")
    parser.add_argument("--root", default=None,
                        help="where each size's data and outputs go (~9 GB at 100k) [default: BENCH_CACHE/scale_<store>]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=32, help="most frames per video (F)")
    parser.add_argument("--dim", type=int, default=768, help="frame feature dimension (D)")
    parser.add_argument("--max-tokens", type=int, default=32, help="text tokens kept (bounds the token store)")
    parser.add_argument("--stages", default=None,
                        help=f"stages to (re)run, of {', '.join(ALL_STAGES)}; the outputs of the others are reused "
                             f"from ROOT [default: {','.join(STAGES)}; with --store synthetic: {','.join(SYNTHETIC_STAGES)}]")
    parser.add_argument("--store", choices=("extract", "synthetic"), default="extract",
                        help="how the store is made: extract (generate + MiniLM extract) or synthetic (random "
                             "features of the same shapes written directly; cost only)")
    parser.add_argument("--report", action="store_true", help="only print the table of ROOT/results.jsonl")
    args = parser.parse_args(argv)
    default = STAGES if args.store == "extract" else SYNTHETIC_STAGES
    args.stages = tuple(s for s in (args.stages or ",".join(default)).split(",") if s)
    unknown = set(args.stages) - set(ALL_STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_STAGES)}")
    clash = {"synthetic": {"generate", "extract"}, "extract": {"synthetic"}}[args.store] & set(args.stages)
    if clash:
        parser.error(f"--store {args.store} does not run stage(s) {', '.join(sorted(clash))}")
    args.root = args.root or str(cache_dir(f"scale_{args.store}"))
    if not args.report:
        env = child_env(args.threads)
        for n in (int(s) for s in args.sizes.split(",")):
            run_size(n, args, env)
    report(args.root, argv, args.store)


if __name__ == "__main__":
    main()
