"""Richer frozen image features on the fashion held-out protocol, through the linear probe first: does
averaging views of each image, or joining several encoder layers, lift [image, title] -> class?

    python bench/make_fashion_views.py --out V --views 2
    python bench/fashion_views_probe.py --cache /work/cache/heldout_masked --run /work/cache/ho/masked/run \
        --views-dir V [--stack submission=/work/cache/ho/masked/stack_submission]

For each image representation, a logistic regression on [image, pooled title] (bench/heldout.py's
linear_probe on raw features, as its `raw` probe: C from {0.01, 0.05, 0.2} by OOF mean-F1 on the run's
folds, refit on every labelled item), scored on the hidden test split with paired 90% bands (1,000
resamples) against the one-view probe (the store's frame, the bar of the held-out tables; --save-bar /
--bar-npz fit it once for several runs, e.g. while the views are still being made):
    one view     the store's frame (the whole image)
    V views      the mean of views.zip's V embeddings (whole, mirror, corner crops)
    layers       layers.zip: head + the last three stages' pooled outputs
    layers + V   the two concatenated
"""
import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_neural import mean_frame_and_title  # noqa: E402
from bench.heldout import linear_probe  # noqa: E402
from bench.protocols import data_dir_of, read_answers  # noqa: E402
from features import schema  # noqa: E402
from features.store import StoreReader, rows_of  # noqa: E402
from neural.metrics import PairedBootstrap, band, challenge_metric  # noqa: E402
from stacking.rundir import load_run  # noqa: E402
from stacking.submission import read_predictions  # noqa: E402

GRID = (0.01, 0.05, 0.2)
VARIANTS = {"one": "one view (the store's frame)", "views": "mean of the views", "layers": "layers (head + 3 stages)",
            "both": "layers + mean of the views"}


def store_part(cache, split, ids):
    """(N, D) the store's mean frame and (N, Dt) pooled title of `ids`: bench/heldout.py's probe features
    (mean_frame_and_title, float64), split at the frame width."""
    with StoreReader(schema.store_path(cache, split)) as reader:
        x = mean_frame_and_title(reader, rows_of(reader.ids, ids, reader.path))           # (N, D + Dt)
        frame_dim = reader.h5[schema.FRAME_EMB].shape[-1]
    return x[:, :frame_dim], x[:, frame_dim:]


def zip_mean(path, ids):
    """(N, D) float64 mean over the rows of each <id>.npy in the zip (float64 as store_part's mean frame:
    the LR's solver runs in the features' precision, and float32 inputs alone moved the probe by 0.0015)."""
    with zipfile.ZipFile(path) as zf:
        return np.stack([np.load(io.BytesIO(zf.read(f"{v}.npy"))).astype(np.float64).mean(0) for v in ids])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="the held-out protocol cache (labeled.h5, test.h5)")
    parser.add_argument("--run", required=True, help="a train-neural run on it (its folds and labels)")
    parser.add_argument("--views-dir", required=True, help="make_fashion_views.py's output (views.zip, layers.zip)")
    parser.add_argument("--stack", action="append", default=[], metavar="NAME=STACK_DIR")
    parser.add_argument("--variants", default="one,views,layers", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--bar-npz", help="the one-view probe saved by --save-bar (or bench/heldout.py's "
                                          "WORK/lr_raw.npz), not refitted")
    parser.add_argument("--save-bar", help="save the one-view probe here, for --bar-npz in later runs")
    parser.add_argument("--grid", default=",".join(map(str, GRID)), help="the LR's C values")
    args = parser.parse_args(argv)
    args.variants, args.grid = args.variants.split(","), [float(c) for c in args.grid.split(",")]

    run = load_run(args.run, ["linear"])                                  # ids, labels and folds
    fold = run.fold
    with StoreReader(schema.store_path(args.cache, "test")) as reader:
        test_ids = reader.ids
    answers = read_answers(data_dir_of(args.cache) / "answers" / "test.csv")
    index = {c: i for i, c in enumerate(run.fine_classes)}
    true = np.array([index[answers[v]] for v in test_ids])
    frame, title = store_part(args.cache, "labeled", run.ids)
    frame_t, title_t = store_part(args.cache, "test", test_ids)
    zips = {"views": Path(args.views_dir) / "views.zip", "layers": Path(args.views_dir) / "layers.zip"}
    parts = {"one": (frame, frame_t)}                                     # variant -> (x (N, D), x_test)
    needed = set(args.variants) | ({"views", "layers"} if "both" in args.variants else set())
    for name in needed & set(zips):
        parts[name] = zip_mean(zips[name], run.ids), zip_mean(zips[name], test_ids)
    if "both" in args.variants:
        parts["both"] = (np.hstack([parts["layers"][0], parts["views"][0]]),
                         np.hstack([parts["layers"][1], parts["views"][1]]))
    preds = {}
    for name in ["one"] + [v for v in args.variants if v != "one"]:
        label = f"LR raw [{VARIANTS[name]}, title]"
        if name == "one" and args.bar_npz:                     # bench/heldout.py's raw probe, same recipe
            saved = np.load(args.bar_npz)
            assert list(saved["ids"]) == list(run.ids), f"{args.bar_npz}: other labelled ids"
            test = saved["test"][rows_of(saved["test_ids"], test_ids, args.bar_npz)]
            preds[label] = test.argmax(1)
            print(f"{name}: C={float(saved['C'])} (from {args.bar_npz}), OOF {saved['scores']}", flush=True)
            continue
        x, x_t = parts[name]
        _, proba, C, scores = linear_probe(np.hstack([x, title]), run.label, np.hstack([x_t, title_t]), fold,
                                           len(run.fine_classes), run.fine_to_coarse, args.grid, scale="raw")
        preds[label] = proba.argmax(1)
        if name == "one" and args.save_bar:
            np.savez(args.save_bar, test=proba, C=C, scores=json.dumps(scores),
                     ids=np.asarray(run.ids, str), test_ids=np.asarray(test_ids, str))
        print(f"{name}: C={C}, OOF {', '.join(f'{c}: {s:.4f}' for c, s in scores.items())}", flush=True)
    for pair in args.stack:
        name, _, stack_dir = pair.partition("=")
        sub = read_predictions(Path(stack_dir) / "submission.csv")
        preds[f"stack {name}"] = np.array([index[sub[v]] for v in test_ids])
    boot = PairedBootstrap(true, run.fine_to_coarse, 1000)
    bar_name = next(iter(preds))
    bar = boot.means(preds[bar_name])
    print(f"\n{len(true)} test items; differences against {bar_name}, paired 90% bands\n")
    print("| method | held-out mean-F1 | vs one view (band) |\n|---|---|---|")
    for name, pred in preds.items():
        score = challenge_metric(true, pred, run.fine_to_coarse)["mean"]
        diff = score - challenge_metric(true, preds[bar_name], run.fine_to_coarse)["mean"]
        lo, hi = band(boot.means(pred) - bar)
        print(f"| {name} | {score:.4f} | {diff:+.4f} ({lo:+.3f}..{hi:+.3f}) |")


if __name__ == "__main__":
    main()
