"""Benchmarks of the knn base model (neural/models/knn.py). Every figure printed is measured in the run.

    search  the blocked top-k search alone: seconds per 1k queries and peak RSS against the bank size
            (10k / 30k / 100k rows of random unit vectors at a given width) and the number of queries;
            each case in its own process, so each peak RSS is that case's alone.
    choose  on a real labelled store: OOF mean-F1 of knn for representation choices (PCA width, k,
            temperature), each varied alone around the defaults, beside `linear` on the same folds.
    heldout on a protocol cache (bench/protocols.py: labeled.h5 + a hidden test.h5 and its answers
            CSV): linear and knn (and knn variants) scored out-of-fold and on the hidden test split,
            and the stack (`run.py stack`, defaults) with and without knn scored on the test split.

    python -m bench knn search --dim 128 --dim 512
    python -m bench knn choose --cache CACHE --out OUT
    python -m bench knn heldout --cache CACHE --answers CACHE_data/answers/test.csv --out OUT
(CACHE: a store, e.g. `python -m bench protocols ucf14 --out bench_cache/heldout_ucf14`.)
"""
import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import torch

from core import schema
from bench.common import REPO, Table, peak_rss_mib, write_record
from features.store import StoreReader
from neural.metrics import challenge_metric
from neural.models.knn import Knn, top_k
from neural.options import NeuralOptions
from neural.pipeline import train_neural

COLUMNS = ("mean", "l2_micro", "l2_macro", "l1_micro", "l1_macro")
BENCHMARK = {"kind": "quality", "summary": "the knn base model: search cost against the bank (search), its options by OOF (choose) and on a hidden test split (heldout)"}


# ------------------------------------------------------------------ search: time and memory


def one_search(n_bank, n_queries, dim, batch, threads):
    """Time `n_queries` queries, `batch` at a time (as predict feeds them), against a bank of `n_bank`
    random unit vectors (float16, as the model keeps it). -> dict of the case's figures."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(n_bank, dim, generator=g), dim=1).half()   # (N, d)
    labels = torch.randint(0, 200, (n_bank,), generator=g)
    rss_bank = peak_rss_mib()
    start = time.perf_counter()
    for first in range(0, n_queries, batch):
        q = torch.nn.functional.normalize(torch.randn(min(batch, n_queries - first), dim, generator=g), dim=1)
        sim, idx = top_k(q, bank, 10, Knn.block_rows)
        labels[idx]                                                  # the votes' gather
    seconds = time.perf_counter() - start
    return {"bank": n_bank, "queries": n_queries, "dim": dim, "s_per_1k": 1000 * seconds / n_queries,
            "rss_after_bank_mib": rss_bank, "peak_rss_mib": peak_rss_mib()}


def search(args, argv):
    table = Table(f"top_k search, k=10, {args.batch} queries per call, random unit vectors, float16 bank, "
                  f"{args.threads} thread(s); each case its own process",
                  ["width d", "bank rows", "queries", "s per 1k queries", "peak RSS MiB (after the bank alone)"])
    for dim in args.dim:
        for n_bank in args.bank:
            for n_queries in args.queries:
                out = subprocess.run([sys.executable, "-m", "bench", "knn", "one", str(n_bank), str(n_queries), str(dim),
                                      str(args.batch), str(args.threads)], capture_output=True, text=True, check=True,
                                     cwd=REPO)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                table.add(dim, f"{n_bank:,}", f"{n_queries:,}", f"{r['s_per_1k']:.3f}",
                          f"{r['peak_rss_mib']:.0f} ({r['rss_after_bank_mib']:.0f})")
    write_record("knn", argv, [table], variant="search")


# ------------------------------------------------------------------ choose: representation by OOF mean-F1


def parse_variant(text, base):
    """'k=20,temperature=0.1' (knn's declared parameters) -> (that text, the options with those values)."""
    from neural.models import parse_params
    values = parse_params(f"knn.{part}" for part in text.split(","))
    return text, with_knn(base, **{k.partition(".")[2]: v for k, v in values.items()})


def with_knn(base, **values):
    """`base` (NeuralOptions) with knn's parameters `values` set over its own."""
    return replace(base, params={**base.params, **{f"knn.{k}": v for k, v in values.items()}})


def knn_value(base, name):
    from neural.models import model_params
    return getattr(model_params("knn", base.params), name)


def variants(base, extra=(), grid=True):
    """(name, options): the defaults, then one choice changed at a time (grid), then each extra."""
    out = [("default", base)]
    if not grid:
        return out + [parse_variant(v, base) for v in extra]
    out += [(f"dim={d}", with_knn(base, dim=d)) for d in (0, 32, 64, 256) if d != knn_value(base, "dim")]
    out += [(f"k={k}", with_knn(base, k=k)) for k in (1, 5, 20, 50) if k != knn_value(base, "k")]
    out += [(f"temperature={t}", with_knn(base, temperature=t)) for t in (0.01, 0.02, 0.1, 1.0)
            if t != knn_value(base, "temperature")]
    return out + [parse_variant(v, base) for v in extra]


def choose(args, argv):
    base = NeuralOptions(n_folds=args.folds, threads=args.threads, batch_size=args.batch_size)
    out = Path(args.out)
    table = Table(f"knn out of fold on {Path(args.cache).name} ({args.folds} folds)", ["knn variant", *COLUMNS, "s per fold"])
    for name, options in variants(base, args.variant, args.grid):
        m = train_neural(args.cache, out / name.replace("=", "_"), ["knn"], options, overwrite=True)["knn"]
        table.add(name, *(m["oof"][c] for c in COLUMNS), f"{sum(m['seconds_per_epoch']) / len(m['seconds_per_epoch']):.2f}")
    if args.linear:
        m = train_neural(args.cache, out / "linear", ["linear"], base, overwrite=True)["linear"]
        table.add("(linear, same folds)", *(m["oof"][c] for c in COLUMNS), f"{sum(m['seconds_per_epoch']):.2f} (all epochs)")
    write_record("knn", argv, [table], variant="choose")


# ------------------------------------------------------------------ heldout: OOF against a hidden test split


def read_answers(path, fine_classes):
    """{id: fine class index} from an answers CSV (id,category_id rows)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {r[0]: fine_classes.index(r[1]) for r in csv.reader(fh) if r}


def test_score(run_dir, model, answers, fine_to_coarse):
    with h5py.File(Path(run_dir) / model / "predictions.h5", "r") as h5:
        proba = h5["proba/test"][:]
    with StoreReader(Path(json.loads((Path(run_dir) / "run.json").read_text())["cache_dir"]) / "test.h5") as r:
        ids = list(r.ids)
    return challenge_metric([answers[i] for i in ids], proba.argmax(1), fine_to_coarse)


def stack_score(run_dir, out, models, answers, fine_classes, fine_to_coarse):
    """`run.py stack` (its defaults) on `models`; its submission.csv scored on the answers."""
    if not (Path(out) / "submission.csv").exists():                # a rerun only scores
        subprocess.run([sys.executable, str(REPO / "run.py"), "stack", "--model", str(run_dir), "--out", str(out), "--models",
                        ",".join(models), "--threads", "1"], check=True, capture_output=True)
    with open(Path(out) / "submission.csv", newline="", encoding="utf-8") as fh:
        pred = {r[0]: fine_classes.index(r[1]) for r in csv.reader(fh) if r}
    ids = sorted(answers)
    return challenge_metric([answers[i] for i in ids], [pred[i] for i in ids], fine_to_coarse)


def heldout(args, argv):
    base = NeuralOptions(n_folds=args.folds, threads=args.threads, batch_size=args.batch_size)
    out = Path(args.out)
    with StoreReader(schema.store_path(args.cache, schema.LABELLED_SPLIT)) as r:
        fine_classes, fine_to_coarse = list(r.fine_classes), r.fine_to_coarse
    answers = read_answers(args.answers, fine_classes)
    table = Table(f"{Path(args.cache).name}: out of fold on the labelled split, scored on the hidden test split",
                  ["model", "OOF mean-F1", "test mean-F1", "test l2 micro", "test l2 macro"])

    def line(name, oof, test):
        table.add(name, oof, test["mean"], test["l2_micro"], test["l2_macro"])

    run = out / "run"
    metrics = train_neural(args.cache, run, ["linear", "knn"], base)
    for model in ("linear", "knn"):
        line(model, metrics[model]["oof"]["mean"], test_score(run, model, answers, fine_to_coarse))
    for name, options in variants(base, args.variant, args.grid)[1:]:
        m = train_neural(args.cache, out / name.replace("=", "_"), ["knn"], options)["knn"]
        line(f"knn {name}", m["oof"]["mean"], test_score(out / name.replace("=", "_"), "knn", answers, fine_to_coarse))
    for models in (["linear"], ["linear", "knn"]):
        line(f"stack of {'+'.join(models)}", "-",
             stack_score(run, out / f"stack_{'_'.join(models)}", models, answers, fine_classes, fine_to_coarse))
    write_record("knn", argv, [table], variant="heldout")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "one":                                    # one case, in its own process
        print(json.dumps(one_search(*(int(v) for v in argv[1:6]))))
        return
    parser = argparse.ArgumentParser(prog="python -m bench knn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search")
    s.add_argument("--dim", type=int, action="append", help="bank width (repeatable; default 128)")
    s.add_argument("--bank", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    s.add_argument("--queries", type=int, nargs="+", default=[1_000, 10_000])
    s.add_argument("--batch", type=int, default=64, help="queries per forward (train-neural's batch size)")
    s.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("choose")
    c.add_argument("--cache", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--folds", type=int, default=5)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--no-linear", dest="linear", action="store_false")
    h = sub.add_parser("heldout")
    h.add_argument("--cache", required=True, help="protocol cache: labeled.h5 and test.h5 (read only)")
    h.add_argument("--answers", required=True, help="the test split's answers CSV (id,category_id)")
    h.add_argument("--out", required=True)
    h.add_argument("--folds", type=int, default=5)
    h.add_argument("--batch-size", type=int, default=64)
    h.add_argument("--threads", type=int, default=1)
    for p in (c, h):
        p.add_argument("--variant", action="append", default=[],
                       help="knn parameters, e.g. k=20,temperature=0.1 (repeatable)")
        p.add_argument("--no-grid", dest="grid", action="store_false", help="only the defaults and each --variant")
    args = parser.parse_args(argv)
    if args.command == "search":
        args.dim = args.dim or [128]
        search(args, argv)
    else:
        {"choose": choose, "heldout": heldout}[args.command](args, argv)


if __name__ == "__main__":
    main()
