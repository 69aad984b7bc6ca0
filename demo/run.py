"""`demo`: the whole tool in one command: (generated) data -> extract -> train-neural -> stack -> the packaged
model directory, on the CPU.

Without --data it generates demo/synthetic.py's demo dataset, whose 14 classes come in four kinds
(text-only, frame-only, order, mix), each findable by a different part of the system, and whose test
labels are known (answers/test.csv). So besides the stack's metric table it prints, per kind, how
often each model is right (out-of-fold on the labelled split, and on the test split), and the test
score of the submission. Each stage is resumable, so a rerun into the same OUT_DIR reuses the work
done (the generated data is regenerated only when its summary.json is missing or describes other
sizes). `--tiny` (DemoOptions.tiny) is the smallest demo that still checks every claim, for the tests.

Learning from the unlabelled split (DemoOptions.unlabelled, on by default when the data has one): the
models are trained twice. First on the labelled split alone (run_labelled/, stacked into
stack_labelled/); then again (run/, stack/) with that first run as the teacher whose fold-k models
pseudo-label the unlabelled split for fold k's students (neural/pseudo.py), and with --pretrain also
the token/frame models pretrained without labels on every split first (neural/pretrain.py; off by
default, as in train-neural: on fashion it lowered the scores, bench/README.md). A table shows each model, the
average and the stack with and without the unlabelled data, out-of-fold and on the test split. The
submission and the packaged model are the second run's.

Then `predict` labels the test split from the packaged model directory alone (inference/predict.py: the
split re-extracted with the recorded encoders, then the model directory's codebook, fold models and
stack), and the demo checks that its labels are the submission's, video for video.

Sizes (DemoOptions.sized): `small`, the default, is the scale a first run can afford; `full` is the
earlier default (1,750 videos of up to 8 frames, 5 folds); `tiny` is --tiny. The frame encoder costs
the same per frame at any size, so videos x frames sets most of a run's time.
"""
import csv
import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.records import read_json, write_json
from core.schema import LABELLED_SPLIT
from features.aggregates import AggregateOptions
from features.categories import load_category_map
from features.extract import ExtractOptions, extract, list_splits
from demo import DemoError
from demo.synthetic import generate_demo_dataset
from inference.package import package_model
from inference.predict import predict
from neural.metrics import challenge_metric
from neural.options import NeuralOptions
from neural.pipeline import available_models, describe_models, train_neural
from stacking.pipeline import StackOptions, describe_auto, stack
from stacking.rundir import load_run, split_predictions
from stacking.submission import read_predictions

TEST_SPLIT = "test"
UNLABELLED_SPLIT = "unlabeled"
SIZES = ("small", "full", "tiny")


@dataclass
class DemoOptions:
    # the generated dataset (ignored with --data); the defaults are the `small` size: the frame encoder's
    # cost is per frame, so videos x frames is most of the run (4 frames still hold an order and a pair)
    n_labelled: int = 350
    n_unlabelled: int = 210           # what the students learn from
    n_test: int = 112                 # predicted twice: by the stack and by `predict` from the model directory
    n_frames: int = 4
    image_size: int = 64
    tail_ratio: float = 12.0          # largest / smallest labelled class
    seed: int = 0
    # extract: few thousand frames, so a small codebook
    frames: int = 4
    max_tokens: int = 64
    pca_dim: int = 32
    n_clusters: int = 8
    n_gmm: int = 4
    workers: int = 1
    # train-neural
    models: tuple = ()                # () = every model the cache allows (names only with class names)
    n_folds: int = 3                  # the fewest the stack allows: each fold trains on 2/3 of the labelled split
    epochs: int = 6
    hidden: int = 64
    batch_size: int = 32
    threads: int = 1                  # torch and LightGBM
    unlabelled: bool = True           # a second run learning from the unlabelled split (pseudo-labels)
    pretrain: bool = False            # that run also pretrains single, dual, cross without labels
    # how the stages run; none of these changes a result
    splits: tuple = ()                # splits of --data to extract; () = every annotations/*.json
    compare: tuple = ("logreg",)
    extra: dict = field(default_factory=dict)   # NeuralOptions overrides, e.g. {"lr": 3e-3}

    @classmethod
    def sized(cls, size):
        """The options of a named size: small (the default), full or tiny."""
        if size not in SIZES:
            raise DemoError(f"size '{size}': choose from {', '.join(SIZES)}")
        return getattr(cls, size)()

    @classmethod
    def small(cls):
        """The default: 672 videos of 3-4 frames, 3 folds, 6 epochs."""
        return cls()

    @classmethod
    def full(cls):
        """The earlier default: 1,750 videos of 4-8 frames (4.5 times small's frames), 5 folds, 6 epochs."""
        return cls(n_labelled=400, n_unlabelled=1200, n_test=150, n_frames=8, frames=8, epochs=6, n_folds=5)

    @classmethod
    def tiny(cls):
        """`demo --tiny`: every stage on the fewest videos and frames that keep each claim checkable: 4
        labelled videos a class (the fewest 3 folds allow), 2 frames each through the encoder, small models,
        both runs (pretraining on, so it is covered too). Its scores are noisy: it shows the wiring, not the
        models."""
        return cls(n_labelled=84, n_unlabelled=42, n_test=14, n_frames=4, image_size=32, tail_ratio=1.0,
                   frames=2, max_tokens=16, pca_dim=8, n_clusters=4, n_gmm=2, workers=0, n_folds=3, epochs=4,
                   hidden=16, extra={"lr": 3e-3}, pretrain=True)


def run_demo(out_dir, data_dir=None, category_map=None, options=None, echo=print):
    """Run every stage into OUT_DIR (data/, cache/, run/, stack/) and echo the results; returns a summary
    dict (also written to OUT_DIR/demo.json): stage seconds, output paths, the stack's table, and for
    the generated data the per-kind accuracies and the test score."""
    options = options or DemoOptions()
    if options.n_folds < 3:
        raise DemoError(f"n_folds={options.n_folds}: the stack tunes its reweighting inside its own "
                         "cross-validation over the run's folds, which needs at least 3")
    torch.set_num_threads(options.threads)        # extract's encoders too
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    times, cpu, peaks, started = {}, {}, {}, time.perf_counter()

    def stage(name, fn, *args):
        echo(f"== {name} ...")
        t0, c0 = time.perf_counter(), cpu_seconds()
        result = fn(*args)
        times[name] = round(time.perf_counter() - t0, 1)
        cpu[name] = round(cpu_seconds() - c0, 1)       # steadier than wall time on a shared machine
        peaks[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)    # Linux: KiB
        echo(f"== {name} done in {times[name]:.1f} s ({cpu[name]:.1f} s CPU; peak RSS so far {peaks[name]:,} MiB)")
        return result

    generated = data_dir is None
    if generated:
        data_dir = out_dir / "data"
        stage("generate", _generate, data_dir, options)
        category_map = data_dir / "category_map.csv"
    data_dir = Path(data_dir)
    cache_dir, run_dir, stack_dir = out_dir / "cache", out_dir / "run", out_dir / "stack"
    splits = list(options.splits) or list_splits(data_dir)
    stage("extract", extract, data_dir, splits, cache_dir, extract_options(options, category_map))
    models = tuple(options.models) or available_models(cache_dir)
    if not options.models:
        echo(describe_models(models))
    stack_options = StackOptions(split=TEST_SPLIT if TEST_SPLIT in splits else "", threads=options.threads,
                                 seed=options.seed, compare=tuple(options.compare))
    learns_unlabelled = options.unlabelled and UNLABELLED_SPLIT in splits
    if learns_unlabelled:
        teacher, teacher_stack = out_dir / "run_labelled", out_dir / "stack_labelled"
        echo(f"first without the {UNLABELLED_SPLIT} split ({teacher}), then learning from it ({run_dir})")
        stage("train-neural (labelled only)", train_neural, cache_dir, teacher, models, neural_options(options))
        teacher_metrics = stage("stack (labelled only)", stack, teacher, teacher_stack, stack_options)
        student = neural_options(options, teacher=str(teacher), unlabeled=UNLABELLED_SPLIT, pretrain=options.pretrain)
        stage("train-neural", train_neural, cache_dir, run_dir, models, student)     # with the unlabelled split
    else:
        stage("train-neural", train_neural, cache_dir, run_dir, models, neural_options(options))
    metrics = stage("stack", stack, run_dir, stack_dir, stack_options)
    model_dir = stage("package", package_model, run_dir, stack_dir)
    predicted = None
    if stack_options.split:
        predicted = stage("predict", predict_like_submission, data_dir, model_dir, out_dir / "predict",
                          stack_dir / "submission.csv")
    times["total"], cpu["total"] = round(time.perf_counter() - started, 1), round(sum(cpu.values()), 1)

    summary = {"options": asdict(options), "data_dir": str(data_dir), "times_s": times, "cpu_s": cpu,
               "peak_rss_mib": peaks, "predict": predicted,
               "outputs": outputs(cache_dir, run_dir, stack_dir, model_dir, metrics, predicted),
               "table": metrics["table"]}
    echo("")
    echo(format_table(metrics["table"]))
    if "auto" in metrics:
        echo(describe_auto(metrics["auto"]))
    if learns_unlabelled:
        summary["unlabelled"] = dict(unlabelled_gain(teacher_metrics["table"], metrics["table"]),
                                     pretrained=options.pretrain)
        if generated and stack_options.split:
            summary["unlabelled"]["test"] = {
                "without": split_scores(data_dir, teacher, teacher_stack, category_map),
                "with": split_scores(data_dir, run_dir, stack_dir, category_map)}
        echo("")
        echo(format_gain(summary["unlabelled"]))
    if generated:
        summary["kinds"] = kind_scores(data_dir, run_dir, stack_dir)
        summary["test"] = score_submission(data_dir, stack_dir / "submission.csv", category_map)
        echo("")
        echo(format_kinds(summary["kinds"]))
        echo("")
        t = summary["test"]
        echo(f"submission on the test split ({t['n_videos']} videos, answers/test.csv): mean-F1 {t['mean']:.4f} "
             f"(l2 {t['l2_micro']:.4f}/{t['l2_macro']:.4f}, l1 {t['l1_micro']:.4f}/{t['l1_macro']:.4f})")
    if predicted:
        echo("")
        echo(f"predict from the model directory alone ({model_dir}): {predicted['n_videos']} {TEST_SPLIT} videos "
             f"-> {predicted['file']}; every label equals the stack's {stack_dir / 'submission.csv'}")
    echo("")
    echo("stage times (s, wall/CPU): " + ", ".join(f"{k} {times[k]:.1f}/{cpu[k]:.1f}" for k in times))
    echo(f"total: {times['total'] / 60:.1f} min wall, {cpu['total']:.0f} s CPU")
    echo("")
    echo(where_to_look(summary["outputs"]))
    write_json(out_dir / "demo.json", summary, default=str)
    return summary


def cpu_seconds():
    """CPU seconds of this process and of its finished children (extract's frame-decoding workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def predict_like_submission(data_dir, model_dir, out_dir, submission):
    """`predict` on the test split from the model directory alone (its own cache under OUT_DIR); returns
    {"file", "n_videos"} once its labels are checked equal to the stack's submission, video for video."""
    out_file = Path(out_dir) / f"{TEST_SPLIT}.csv"
    predict(data_dir, TEST_SPLIT, model_dir, out_file, Path(out_dir) / "cache")
    predicted, submitted = read_predictions(out_file), read_predictions(submission)
    differ = sorted(v for v in set(predicted) | set(submitted) if predicted.get(v) != submitted.get(v))
    if differ:
        v = differ[0]
        raise DemoError(f"{out_file}: predict's labels differ from {submission} on {len(differ)} of "
                        f"{len(submitted)} {TEST_SPLIT} videos (first: video {v}, {predicted.get(v)} against "
                        f"{submitted.get(v)})")
    return {"file": str(out_file), "n_videos": len(predicted)}


def _generate(data_dir, options):
    """Generate unless a dataset of the same configuration is already there (resume)."""
    args = dict(n_labelled=options.n_labelled, n_unlabelled=options.n_unlabelled, n_test=options.n_test,
                n_frames=options.n_frames, image_size=options.image_size, tail_ratio=options.tail_ratio,
                seed=options.seed, n_folds=options.n_folds)
    summary_path = data_dir / "summary.json"
    if summary_path.exists():
        old = read_json(summary_path, error=DemoError)
        sizes = {s: v["n_videos"] for s, v in old["splits"].items()}
        if sizes == {LABELLED_SPLIT: args["n_labelled"], "unlabeled": args["n_unlabelled"], "test": args["n_test"]} \
                and all(old["config"][k] == args[k] for k in ("n_frames", "image_size", "tail_ratio", "seed")):
            return old
    return generate_demo_dataset(data_dir, **args)


def extract_options(options, category_map):
    agg = AggregateOptions(pca_dim=options.pca_dim, n_clusters=options.n_clusters, n_gmm=options.n_gmm,
                           seed=options.seed)
    return ExtractOptions(frames=options.frames, max_tokens=options.max_tokens,
                          category_map=str(category_map) if category_map else None,
                          workers=options.workers, device="cpu", aggregates=agg)


def neural_options(options, **unlabelled):
    """The run's NeuralOptions; `unlabelled`: teacher, unlabeled and pretrain for the second run."""
    return NeuralOptions(n_folds=options.n_folds, seed=options.seed, epochs=options.epochs, hidden=options.hidden,
                         batch_size=options.batch_size, max_tokens=options.max_tokens, threads=options.threads,
                         **{**options.extra, **unlabelled})


# ---------------------------------------------------------------- with and without the unlabelled split

def unlabelled_gain(without, with_):
    """{"oof": {row: [mean-F1 without, with]}} for every row of the two stacks' tables (base models, average,
    stackers), out-of-fold on the labelled split."""
    return {"oof": {name: [without[name]["mean"], with_[name]["mean"]] for name in with_ if name in without}}


def split_scores(data_dir, run_dir, stack_dir, category_map):
    """{row: mean-F1 on the test split}: each base model, their average, and the submission."""
    cmap = load_category_map(category_map)
    run = load_run(run_dir)
    ids, probas = split_predictions(run, TEST_SPLIT)
    answers = read_answers(Path(data_dir) / "answers" / f"{TEST_SPLIT}.csv")
    index = {c: i for i, c in enumerate(run.fine_classes)}
    true = [index[answers[v]] for v in ids]
    rows = {f"base:{m}": p.argmax(1) for m, p in probas.items()}
    rows["average"] = np.mean(list(probas.values()), 0).argmax(1)
    out = {name: float(challenge_metric(true, list(pred), cmap.fine_to_coarse)["mean"]) for name, pred in rows.items()}
    out["submission"] = score_submission(data_dir, Path(stack_dir) / "submission.csv", category_map)["mean"]
    return out


def format_gain(gain):
    """Each row's mean-F1 without and with the unlabelled split, out-of-fold and (generated data) on the test split."""
    test = gain.get("test", {})
    names = list(gain["oof"]) + [n for n in test.get("with", {}) if n not in gain["oof"]]
    lines = ["mean-F1 without / with the unlabelled split (pseudo-labels from the labelled-only run"
             + ("; single, dual, cross also pretrained)" if gain.get("pretrained") else ")"),
             f"{'':56s} {'out-of-fold':>21s} {'test split':>21s}"]
    for name in names:
        oof = gain["oof"].get(name)
        left = f"{oof[0]:10.4f} {oof[1]:10.4f}" if oof else f"{'':21s}"
        right = f"{test['without'][name]:10.4f} {test['with'][name]:10.4f}" if name in test.get("with", {}) else ""
        lines.append(f"{name:56s} {left:>21s} {right:>21s}")
    return "\n".join(lines)


def outputs(cache_dir, run_dir, stack_dir, model_dir, metrics, predicted=None):
    out = {"stores": str(cache_dir), "run": str(run_dir), "metrics": str(stack_dir / "metrics.json"),
           "per-class F1": str(stack_dir / "per_class_f1.png"), "model": str(model_dir)}
    for split, written in metrics["predictions"].items():
        out[f"{split} labels"] = str(stack_dir / written["file"])
    if predicted:
        out["predict"] = predicted["file"]
    return out


WHERE = {                   # what each output is, for the lines after the run
    "metrics": "the table above (each model, their average, the stackers; out-of-fold)",
    "per-class F1": "F1 of every class, each base model against the stack",
    "model": "the packaged model: all `python run.py predict --model` needs",
    "predict": "predict's labels from that model directory (equal to the submission)",
    "stores": "the cached features (extract)",
    "run": "the fold models and their out-of-fold predictions (train-neural)",
}


def where_to_look(paths):
    """One line per output: its path, then what it is."""
    lines = ["where to look:"]
    for name in [*WHERE, *(n for n in paths if n not in WHERE)]:
        if name in paths:
            note = WHERE.get(name, "the stack's labels of that split")
            lines.append(f"{name:14s} {paths[name]}  <- {note}")
    return "\n".join(lines)


def format_table(table):
    lines = [f"{'model (out-of-fold on the labelled split)':64s} {'mean-F1':>8s} {'l2 mic':>7s} {'l2 mac':>7s} "
             f"{'l1 mic':>7s} {'l1 mac':>7s}"]
    for name, m in table.items():
        lines.append(f"{name:64s} {m['mean']:8.4f} {m['l2_micro']:7.4f} {m['l2_macro']:7.4f} "
                     f"{m['l1_micro']:7.4f} {m['l1_macro']:7.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- per kind (generated data only)

def class_kinds(data_dir, fine_classes):
    """(C,) the kind (text-only, frame-only, order, mix) of each fine class, from the generator's summary."""
    groups = json.loads((Path(data_dir) / "summary.json").read_text())["signal_groups"]
    kind_of = {cid: kind for kind, ids in groups.items() for cid in ids}
    return np.array([kind_of[c] for c in fine_classes])


def accuracy_by_kind(label, pred, kinds):
    """{kind: accuracy over the videos whose true class is of that kind}; label, pred (N,) class indices."""
    return {k: float((pred[kinds[label] == k] == label[kinds[label] == k]).mean())
            for k in dict.fromkeys(kinds) if (kinds[label] == k).any()}


def kind_scores(data_dir, run_dir, stack_dir):
    """{"oof": {model: {kind: acc}}, "test": {...}}: each base model, their average and (test only) the
    submission, which is the stack after reweighting."""
    run = load_run(run_dir)
    kinds = class_kinds(data_dir, run.fine_classes)
    index = {c: i for i, c in enumerate(run.fine_classes)}
    oof = {m: accuracy_by_kind(run.label, p.argmax(1), kinds) for m, p in run.oof.items()}
    oof["average"] = accuracy_by_kind(run.label, np.mean(list(run.oof.values()), 0).argmax(1), kinds)
    ids, probas = split_predictions(run, TEST_SPLIT)
    answers = read_answers(Path(data_dir) / "answers" / f"{TEST_SPLIT}.csv")
    label = np.array([index[answers[v]] for v in ids])
    test = {m: accuracy_by_kind(label, p.argmax(1), kinds) for m, p in probas.items()}
    test["average"] = accuracy_by_kind(label, np.mean(list(probas.values()), 0).argmax(1), kinds)
    submitted = read_predictions(Path(stack_dir) / "submission.csv")
    test["stack (submission)"] = accuracy_by_kind(label, np.array([index[submitted[v]] for v in ids]), kinds)
    chance = {k: 1.0 / int((kinds == k).sum()) for k in dict.fromkeys(kinds)}   # the kind known, not the class
    return {"oof": oof, "test": test, "chance_within_kind": chance, "n_classes": len(kinds)}


def format_kinds(scores):
    kinds = list(scores["chance_within_kind"])
    head = "".join(f"{k:>11s}" for k in kinds)
    lines = ["accuracy by kind of class (videos of that kind's classes, right fine class among all)",
             f"{'model':22s}{'|':>2s} out-of-fold (labelled){'':{max(0, 11 * len(kinds) - 22)}s} | test split",
             f"{'':22s} |{head} |{head}"]
    def cells(accuracy):            # a kind with no video in that split (a tiny test split) shows "-"
        return "".join(f"{accuracy[k]:11.3f}" if k in accuracy else f"{'-':>11s}" for k in kinds)

    for model in scores["test"]:
        oof = scores["oof"].get(model)
        left = cells(oof) if oof else f"{'(not saved)':>{11 * len(kinds)}s}"
        right = cells(scores["test"][model])
        lines.append(f"{model:22s} |{left} |{right}")
    chance = "".join(f"{scores['chance_within_kind'][k]:11.3f}" for k in kinds)
    lines.append(f"{'(kind known, guessed)':22s} |{chance} |{chance}")
    lines.append(f"(a blind guess among all {scores['n_classes']} classes: {1 / scores['n_classes']:.3f})")
    return "\n".join(lines)


def read_answers(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return {row[0]: row[1] for row in csv.reader(fh) if row}


def score_submission(data_dir, submission, category_map):
    """The challenge metric of the submission against the generator's hidden test labels."""
    cmap = load_category_map(category_map)
    answers = read_answers(Path(data_dir) / "answers" / f"{TEST_SPLIT}.csv")
    submitted = read_predictions(submission)
    missing = set(answers) - set(submitted)
    if missing:
        raise DemoError(f"{submission}: no prediction for test video {sorted(missing)[0]} "
                         f"({len(missing)} missing)")
    ids = sorted(answers)
    true = [cmap.fine_index(answers[v]) for v in ids]
    pred = [cmap.fine_index(submitted[v]) for v in ids]
    return {"n_videos": len(ids), **{k: float(v) for k, v in challenge_metric(true, pred, cmap.fine_to_coarse).items()}}
