"""Command line: each command parses its options and calls one function."""

import click


INTERRUPTED = ("Interrupted (SIGINT): stopped; run the same command again to go on (extract and train-neural "
               "resume from the batches and folds they finished)")


class PipelineGroup(click.Group):
    """Shows the project's own errors (bad file, id, field; wrong store) as one line, not a traceback, and
    Ctrl-C as one line with exit status 130 (128 + SIGINT), as shells expect (click's own: 1, 'Aborted!')."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:
            click.echo(INTERRUPTED, err=True)
            raise click.exceptions.Exit(130) from err
        except (FileNotFoundError, NotADirectoryError) as err:
            raise click.ClickException(str(err)) from err
        except Exception as err:
            if is_project_error(err):
                raise click.ClickException(f"{type(err).__name__}: {err}") from err
            raise


PROJECT_PACKAGES = ("features", "neural", "stacking", "inference", "demo")


def is_project_error(err):
    """An error of the project's own classes (AnnotationError, MediaFault, StoreError, ...), raised on purpose
    with a message naming the file, id and field; anything else is a bug and keeps its traceback."""
    return type(err).__module__.split(".")[0] in PROJECT_PACKAGES


@click.group(cls=PipelineGroup)
@click.version_option(package_name="shortvideo-classifier")
def cli():
    """Multimodal short-video classifier: extract -> train-neural -> stack -> predict."""


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset root in the challenge layout (annotations/, zip_frames/ or zip_feats/ or videos/).")
@click.option("--split", "splits", multiple=True,
              help="Split to extract (repeatable); default: every DATA/annotations/*.json.")
@click.option("--out", "cache_dir", required=True, type=click.Path(file_okay=False), help="Cache directory.")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False), help="Annotations file (one split).")
@click.option("--category-map", type=click.Path(exists=True, dir_okay=False),
              help="category_id,level1_id,level1_name,level2_name CSV; default: the challenge's 200 classes.")
@click.option("--frame-encoder", default="efficientnet-lite0", show_default=True,
              help="efficientnet-lite0 | clip:<arch>@<pretrained tag or checkpoint path>")
@click.option("--text-encoder", default="minilm", show_default=True, help="minilm | bert:<dir or hub name>")
@click.option("--frames", default=32, show_default=True, help="Frames kept per video (sampled uniformly).")
@click.option("--max-tokens", default=128, show_default=True,
              help="Tokens of the joined text cached (train-neural's --max-tokens, 64 by default, reads the first of "
                   "these).")
@click.option("--frames-from", type=click.Choice(["auto", "zip", "npy", "video"]), default="auto", show_default=True,
              help="Frame layout to read: auto = the one DATA holds for the split (zip_frames/, zip_feats/ or videos/).")
@click.option("--limit", type=int, help="Only the first N videos of each split.")
@click.option("--batch-size", default=32, show_default=True, help="Videos per batch (a resume unit).")
@click.option("--frame-batch", default=0, show_default=True,
              help="Most images per frame-encoder forward (0: 32 on CPU, 256 on GPU); bounds memory.")
@click.option("--workers", default=2, show_default=True, help="Processes decoding frames and tokenising.")
@click.option("--threads", default=0, show_default=True,
              help="Torch CPU threads of the encoders (0: torch's default; under torchrun each rank's share).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the encoders run (auto: a GPU when torch sees one).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Encoders' precision, part of each store's identity: auto = fp32 on the CPU, bf16 on a GPU "
                   "that supports it, else fp16.")
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnx", "openvino"]), default="auto", show_default=True,
              help="Encoders' runtime: auto = onnx (ONNX Runtime, exported once and cached) on the CPU in fp32, else "
                   "torch. torch, onnx and openvino in fp32 make interchangeable features (features/runtime.py).")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="skip: mask a video's bad media, count and report it; fail: stop at the first.")
@click.option("--overwrite", is_flag=True,
              help="Rebuild stores made with other encoders or options (train-neural's --overwrite deletes its run "
                   "directory instead).")
@click.option("--aggregates/--no-aggregates", default=True, show_default=True,
              help="Also cache first frame, VLAD-family aggregates and frame-shift similarities.")
@click.option("--poolings", default="all", show_default=True,
              help="Comma-separated frozen poolings cached as aggregates; all: every one of features/pooling.py's "
                   "POOLINGS.")
@click.option("--pca-dim", default=64, show_default=True, help="Frames are PCA-reduced to this before pooling.")
@click.option("--clusters", default=16, show_default=True, help="k-means clusters of the VLAD family.")
@click.option("--gmm-components", default=8, show_default=True, help="Diagonal-GMM components of NetFV.")
@click.option("--codebook-sample", default=50000, show_default=True, help="Frames sampled to fit the codebook.")
def extract(data_dir, splits, cache_dir, aggregates, poolings, pca_dim, clusters, gmm_components,
            codebook_sample, **options):
    """Cache frame and text embeddings (and video aggregates) in one HDF5 store per split."""
    from features.aggregates import AggregateOptions
    from features.extract import ExtractOptions, extract as run_extract, list_splits
    named = {} if poolings == "all" else {"poolings": tuple(p.strip() for p in poolings.split(",") if p.strip())}
    agg = AggregateOptions(**named, pca_dim=pca_dim, n_clusters=clusters, n_gmm=gmm_components,
                           sample_size=codebook_sample)
    opts = ExtractOptions(**options, aggregates=agg if aggregates else None)
    reports = run_extract(data_dir, list(splits) or list_splits(data_dir), cache_dir, opts)
    for split, report in reports.items():
        widths = report.get("aggregates", {}).get("total_width")
        click.echo(f"{split}: {report['n_videos']} videos, {report['n_videos_with_faults']} with media faults "
                   f"-> {report['store']} (report: {split}.report.json"
                   + (f"; aggregates: {widths} values per video)" if widths else ")"))


def _neural_defaults():
    from neural.options import NeuralOptions
    return NeuralOptions()


_NEURAL = _neural_defaults()


class _ModelsOption(click.Option):
    """--models, whose help comes from the model registry when help is shown (importing the registry
    loads torch: seconds that no other command should pay at start-up)."""

    def get_help_record(self, ctx):
        from neural.models import models_help
        self.help = models_help()
        return super().get_help_record(ctx)


class _ParamsOption(click.Option):
    """--param, whose help lists every model's declared parameters (from the registry, when help is shown)."""

    def get_help_record(self, ctx):
        from neural.models import params_help
        self.help = params_help()
        return super().get_help_record(ctx)


def _model_params(ctx, param, values):
    """--param [MODEL.]NAME=VALUE strings -> {"[model.]name": typed value}; a bad one is a usage error."""
    if not values:
        return {}
    from neural.models import ModelNameError, ModelParamError, parse_params
    try:
        return parse_params(values)
    except (ModelNameError, ModelParamError) as err:
        raise click.BadParameter(str(err)) from err


@cli.command("train-neural")
@click.option("--cache", "cache_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Cache directory of `extract` (labeled.h5, other splits, codebook.h5).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--models", cls=_ModelsOption, default=None,
              help="Comma-separated base models; default: every model the cache allows (the list: --help).")
@click.option("--split", "splits", multiple=True,
              help="Other split to predict (repeatable); default: every other store in the cache.")
@click.option("--folds", "n_folds", default=_NEURAL.n_folds, show_default=True,
              help="Folds of the out-of-fold scheme (one model per fold per base model).")
@click.option("--seed", default=_NEURAL.seed, show_default=True, help="Seed of the folds, the models and the batches.")
@click.option("--groups", default=_NEURAL.groups, show_default=True, metavar="auto|none|FILE",
              help="Folds never split a group (StratifiedGroupKFold), so out-of-fold scores and the stack measure "
                   "unseen groups. auto: near-duplicate groups (clips of one video or actor, a product in other "
                   "colours, re-uploads) found in the cached features: mutual nearest neighbours much closer than "
                   "their neighbourhood, the threshold set from the data's own intrinsic dimension "
                   "(neural/neardup.py); used when at least 2% of the labelled videos are grouped, else the "
                   "folds stay stratified. FILE: a CSV id,group (header allowed; every labelled id needs a "
                   "group). Stratified as far as whole groups allow. Recorded in run.json and folds.h5 (auto: the "
                   "rule, its threshold, how many videos were grouped); a resume must give the same value.")
@click.option("--epochs", default=_NEURAL.epochs, show_default=True, help="Passes over the labelled rows per fold.")
@click.option("--batch-size", default=_NEURAL.batch_size, show_default=True, help="Videos per training step.")
@click.option("--lr", default=_NEURAL.lr, show_default=True, help="Peak learning rate (AdamW, cosine schedule).")
@click.option("--hidden", default=_NEURAL.hidden, show_default=True, help="Width of every model.")
@click.option("--layers", "n_layers", default=_NEURAL.n_layers, show_default=True,
              help="Transformer layers of single, dual and cross.")
@click.option("--dropout", default=_NEURAL.dropout, show_default=True, help="Dropout of every model.")
@click.option("--max-tokens", default=_NEURAL.max_tokens, show_default=True,
              help="Text tokens the token models read: the first of the ones extract cached (its --max-tokens, 128 "
                   "by default); fewer is faster.")
@click.option("--param", "params", multiple=True, metavar="[MODEL.]NAME=VALUE", cls=_ParamsOption,
              callback=_model_params, help="A model's own parameter (repeatable; the list: --help).")
@click.option("--label-smoothing", default=_NEURAL.label_smoothing, show_default=True,
              help="Label smoothing of the cross-entropy.")
@click.option("--class-balanced/--no-class-balanced", default=_NEURAL.class_balanced, show_default=True,
              help="Weigh the loss per class by the effective number of its videos (class-balanced loss, for the long tail).")
@click.option("--ema/--no-ema", default=_NEURAL.ema, show_default=True,
              help="Predict with an exponential moving average of the weights.")
@click.option("--fgm/--no-fgm", default=_NEURAL.fgm, show_default=True,
              help="Adversarial training (FGM): each step also learns from its inputs moved along their loss gradient.")
@click.option("--rdrop/--no-rdrop", default=_NEURAL.rdrop, show_default=True,
              help="R-Drop: two dropout passes per step, their predictions pulled together.")
@click.option("--pretrain/--no-pretrain", default=_NEURAL.pretrain, show_default=True,
              help="Self-supervised pretraining of single, dual and cross on every store in the cache (masked "
                   "frames and token states, video-text matching and alignment; no labels), once per model, "
                   "before its folds, which all start from it; other models ignore it.")
@click.option("--pretrain-epochs", default=_NEURAL.pretrain_epochs, show_default=True,
              help="Pretraining passes over every store in the cache, per pretrainable model.")
@click.option("--unlabeled", default=_NEURAL.unlabeled, metavar="SPLIT",
              help="Unlabelled split learnt from (CACHE/SPLIT.h5); default: CACHE/unlabeled.h5 when there is one.")
@click.option("--teacher", default=_NEURAL.teacher, metavar="RUN_DIR|STACK_DIR",
              help="Finished train-neural run (or a stack of one, its base models) with the same folds: its fold-k "
                   "models pseudo-label the unlabelled split for fold k's student; a student run can teach round 2. "
                   "A stack made with `stack --teach SPLIT` teaches through its per-fold stackers' pseudo-labels "
                   "(fold k's fitted on the other folds only), made from that split.")
@click.option("--pseudo-weight", default=_NEURAL.pseudo_weight, show_default=True,
              help="Weight of the distillation loss on pseudo-labelled rows.")
@click.option("--pseudo-temperature", default=_NEURAL.pseudo_temperature, show_default=True,
              help="Temperature of the teacher's softened targets.")
@click.option("--pseudo-threshold", default=_NEURAL.pseudo_threshold, show_default=True,
              help="Rows whose teacher max-probability is lower are not used.")
@click.option("--pseudo-ratio", default=_NEURAL.pseudo_ratio, show_default=True,
              help="Pseudo-labelled rows per step, as a multiple of --batch-size.")
@click.option("--pseudo-finetune-epochs", default=_NEURAL.pseudo_finetune_epochs, show_default=True,
              help="Epochs on labelled rows only after --epochs with pseudo-labels.")
@click.option("--pseudo-modality-drop", default=_NEURAL.pseudo_modality_drop, show_default=True,
              help="Share of pseudo-labelled rows (with text and frames) that lose one of them, drawn at random, "
                   "before the student matches the teacher's target from the whole video: consistency under a "
                   "dropped modality. 0: off.")
@click.option("--workers", "num_workers", default=_NEURAL.num_workers, show_default=True,
              help="DataLoader worker processes.")
@click.option("--threads", default=_NEURAL.threads, show_default=True,
              help="Torch CPU threads (0: torch's default; under torchrun each rank's share of the cores).")
@click.option("--overwrite", is_flag=True,
              help="Delete the run's own files in --out first and train again (extract's --overwrite rebuilds "
                   "stores instead).")
def train_neural(cache_dir, out_dir, models, overwrite, **options):
    """Train fusion models out-of-fold on the cached features; resumable per model and fold. Under
    `torchrun --nproc-per-node N` the fold fits are spread over the N processes (same result)."""
    from core.world import current_world
    from neural.models import check_params, parse_models
    from neural.options import NeuralOptions
    from neural.pipeline import available_models, describe_models, train_neural as run_train
    from neural.pretrain import pretrainable
    from neural.unlabelled import describe_unlabelled, unlabelled_path
    names = available_models(cache_dir) if models is None else parse_models(models)
    neural_options = NeuralOptions(**options).check()
    try:
        check_params(neural_options.params, names)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--param") from err
    world = current_world()
    if models is None and world.is_main:
        click.echo(describe_models(names))
    uses = [f"pseudo-labels from {options['teacher']}"] if options["teacher"] else []
    pretrained = [n for n in names if neural_options.pretrain and pretrainable(n)]
    if pretrained and unlabelled_path(cache_dir, neural_options.unlabeled):   # it reads every store in the cache
        uses.append(f"self-supervised pretraining of {', '.join(pretrained)}")
    unlabelled_line = describe_unlabelled(cache_dir, neural_options.unlabeled, uses)
    if unlabelled_line and world.is_main:
        click.echo(unlabelled_line)
    results = run_train(cache_dir, out_dir, names, neural_options, overwrite, world)
    for name, metrics in results.items() if world.is_main else ():
        oof = metrics["oof"]
        click.echo(f"{name}: OOF mean-F1 {oof['mean']:.4f} (l2 micro {oof['l2_micro']:.4f}, "
                   f"macro {oof['l2_macro']:.4f}; l1 micro {oof['l1_micro']:.4f}, macro {oof['l1_macro']:.4f}) "
                   f"-> {out_dir}/{name}/predictions.h5")


def _stackers():
    import stacking.stackers          # the registry; its Stacker base imports sklearn (~1.5 s), lightgbm on use
    return stacking.stackers


_STACKERS = _stackers()


def _stacker_params(ctx, param, values):
    try:
        return _STACKERS.parse_overrides(values)
    except _STACKERS.StackerError as err:
        raise click.BadParameter(str(err)) from err


def _stacker_kinds(ctx, param, value):
    unknown = [k for k in value.split(",") if k and k not in _STACKERS.STACKERS]
    if unknown:
        raise click.BadParameter(f"unknown stacker(s) {', '.join(unknown)}; choose from {', '.join(_STACKERS.STACKERS)}")
    return value


@cli.command()
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="Run directory of `train-neural` (run.json, folds.h5, <model>/predictions.h5). Required.")
@click.option("--model", "run_dir_alias", type=click.Path(exists=True, file_okay=False), hidden=True,
              help="Old name of --run (predict's --model is a model directory).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Stack directory: submission.csv, metrics.json, per_class_f1.png, the fitted stack.")
@click.option("--models", default="", help="Comma-separated base models; default: every model of the run.")
@click.option("--stacker", type=click.Choice([*_STACKERS.STACKERS, "auto"]), default="rerank", show_default=True,
              help=f"The stacker fitted and saved. {_STACKERS.describe_stackers()}; auto: rerank, the "
                   "average and the --compare stackers scored by their out-of-fold passes; rerank is kept "
                   "unless another beats it with the 90% paired bootstrap band of its gain above zero, then "
                   "the best of those is fitted (its score is optimistic by the choice; see --nested-choice).")
@click.option("--param", "params", multiple=True, metavar="[KIND.]NAME=VALUE", callback=_stacker_params,
              help="Set a stacker parameter (repeatable), for every stacker in use that has it or for KIND "
                   f"only. {_STACKERS.describe_params()}.")
@click.option("--reweight", type=click.Choice(["auto", "power", "inverse"]), default="auto", show_default=True,
              help="Long-tail reweighting p_c * n_c^-tau (power) or p_c * (a / n_c + 1) (inverse), tuned nested.")
@click.option("--compare", default="logreg", show_default=True, callback=_stacker_kinds,
              help=f"Comma-separated extra stackers scored side by side: {', '.join(_STACKERS.STACKERS)} "
                   "(with --stacker auto: its candidates besides rerank and the average).")
@click.option("--nested-choice/--no-nested-choice", default=True, show_default=True,
              help="With --stacker auto: also choose inside each outer fold on the other folds only and "
                   "report that honest score (every stacker's OOF pass again per outer fold: about folds-1 "
                   "times the cost of scoring them all once).")
@click.option("--label-shift", type=click.Choice(["auto", "em", "none"]), default="none", show_default=True,
              help="Each predicted split's class priors are estimated by EM on the stacker's calibrated probabilities "
                   "(Saerens et al. 2002) and recorded in metrics.json; auto applies them (as prior ratios, "
                   "before the reweighting) when the split's priors differ from the labelled ones by more than the "
                   "estimate differs on the run's own folds (no shift there), em always, none never (the default: "
                   "applying them has lowered held-out scores so far, docs/results.md).")
@click.option("--decode/--no-decode", default=True, show_default=True,
              help="Metric-aware decoding: a class the arg-max opens with 1-2 items whose expected count in the "
                   "split is below one is closed (its items go to their next class) when that raises the expected "
                   "challenge metric (a predicted class absent from the truth adds a macro-F1 of 0).")
@click.option("--shift-stats/--no-shift-stats", "use_shift_stats", default=True, show_default=True,
              help="Add the store's agg/shift_stats to the per-video signals.")
@click.option("--split", default="test", show_default=True,
              help="Split written to submission.csv ('' for none); other splits go to predictions_<split>.csv.")
@click.option("--threads", default=1, show_default=True,
              help="LightGBM threads (1, not 0 as in extract, train-neural and predict: LightGBM's all-cores default "
                   "slows down many times over when other jobs share the cores).")
@click.option("--seed", default=0, show_default=True, help="Seed of the stackers and the decoding's draws.")
@click.option("--teach", default="", metavar="SPLIT",
              help="Also write STACK_DIR/pseudo/fold<k>.h5 for `train-neural --teacher STACK_DIR`: pseudo-labels of "
                   "the unlabelled SPLIT of the run's cache by fold k's stacker (fitted on the other folds' OOF rows "
                   "only) over the base models' fold-k models, so they stay out-of-fold honest. Without it a STACK_DIR "
                   "teaches through its base models.")
def stack(run_dir, run_dir_alias, out_dir, models, compare, **options):
    """Stack the run's base models (scored on the run's folds), reweight the long tail, write the submission."""
    run_dir = run_dir or run_dir_alias
    if run_dir is None:
        raise click.UsageError("Missing option '--run' (the run directory of train-neural)")
    from inference.package import stack_and_package
    from stacking.pipeline import StackOptions, describe_auto
    opts = StackOptions(models=tuple(m for m in models.split(",") if m),
                        compare=tuple(c for c in compare.split(",") if c), **options)
    metrics, model_dir = stack_and_package(run_dir, out_dir, opts)
    for name, m in metrics["table"].items():
        click.echo(f"{name:64s} mean-F1 {m['mean']:.4f} (l2 {m['l2_micro']:.4f}/{m['l2_macro']:.4f}, "
                   f"l1 {m['l1_micro']:.4f}/{m['l1_macro']:.4f})")
    if "auto" in metrics:
        click.echo(describe_auto(metrics["auto"]))
    click.echo(f"-> {out_dir}/metrics.json, per_class_f1.png, stacker/, reweight.json"
               + "".join(f", {v['file']}" for v in metrics["predictions"].values()))
    if "teach" in metrics:
        click.echo(f"teacher: pseudo-labels of {metrics['teach']['split']} ({metrics['teach']['rows']} videos) by "
                   f"per-fold stackers -> {out_dir}/{metrics['teach']['files']}")
    click.echo(f"model directory (all `predict --model` needs): {model_dir}")


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset root in the challenge layout holding the new videos (zip_frames/, zip_feats/ or videos/).")
@click.option("--split", required=True, help="Split of DATA to label (DATA/annotations/<split>.json).")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Model directory written by `stack` (STACK_DIR/model, or STACK_DIR itself); may be copied "
                   "anywhere.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="Output CSV: id,category_id lines, no header (the challenge's submission format).")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also write the K most probable fine classes of each video to OUT.topk.csv (labels.csv -> "
                   "labels.topk.csv): header id,rank,category_id,level1_id,probability, the stacker's "
                   "probabilities; 0: none.")
@click.option("--proba", "proba_file", type=click.Path(dir_okay=False), metavar="FILE.h5",
              help="Also write the stacker's whole (N, C) probability matrix as HDF5: proba, ids, fine_classes, "
                   "level1_ids, pred (the label's column).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the encoders and fold models run (auto: a GPU when torch sees one).")
@click.option("--threads", default=0, show_default=True,
              help="Torch CPU threads (0: torch's default), as extract's --threads.")
@click.option("--batch-size", default=32, show_default=True, help="Videos per extract batch.")
@click.option("--workers", default=2, show_default=True, help="Processes decoding frames and tokenising.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Encoders' precision [default: the one model.json records]; another is refused, since features "
                   "in another precision are not those the fold models learnt from.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False),
              help="Where the new split's features are cached; default: OUT.cache/.")
@click.option("--runtime", type=click.Choice(["torch", "onnx", "openvino"]), default=None,
              help="Encoders' runtime [default: the one model.json records]; another must make interchangeable "
                   "features (torch, onnx, openvino in fp32).")
def predict(data_dir, split, model_dir, out_file, cache_dir, runtime, top_k, proba_file, **controls):
    """Label new videos: recorded encoders -> aggregates -> fold models -> stacker, one CSV line per video."""
    from inference.predict import Controls, predict as run_predict, top_k_path
    pred = run_predict(data_dir, split, model_dir, out_file, cache_dir, runtime, Controls(**controls), top_k,
                       proba_file)
    extra = ([f"top {top_k}: {top_k_path(out_file)}"] if top_k else []) + ([f"(N, C): {proba_file}"] if proba_file else [])
    click.echo(f"{len(pred)} videos -> {out_file}" + (f" ({'; '.join(extra)})" if extra else ""))


@cli.command("demo")
@click.option("--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Where data/ (generated), cache/, run/, stack/ and demo.json go; a rerun resumes.")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Real dataset root in the challenge layout; default: generate the demo dataset.")
@click.option("--category-map", type=click.Path(exists=True, dir_okay=False),
              help="Category map of --data (default: the challenge's 200 classes).")
@click.option("--split", "splits", multiple=True,
              help="Split of --data to run (repeatable); default: every DATA/annotations/*.json.")
@click.option("--size", type=click.Choice(["small", "full", "tiny"]), default="small", show_default=True,
              help="Scale of the generated data and training: small, a first run; full, 1,750 videos of up to 8 frames, "
                   "5 folds, 6 epochs; tiny, as --tiny.")
@click.option("--tiny", is_flag=True,
              help="Same as --size tiny: the fewest videos and frames that still run every stage (84 labelled, "
                   "2 frames each, 3 folds, both runs, pretraining on); noisy scores; for checking that it all "
                   "fits together.")
@click.option("--epochs", type=int, help="Epochs of each model [default: the size's].")
@click.option("--folds", "n_folds", type=int, help="Folds [default: the size's].")
@click.option("--models", default="", help="Comma-separated base models; default: every model the cache allows.")
@click.option("--threads", default=1, show_default=True,
              help="Torch and LightGBM CPU threads (1: the demo runs on shared machines; extract, train-neural and "
                   "predict default to 0, torch's own choice).")
@click.option("--unlabelled/--no-unlabelled", "unlabelled_alias", default=None, hidden=True,
              help="Old spelling of --unlabeled.")
@click.option("--unlabeled/--no-unlabeled", "unlabelled", default=None,
              help="Train a second time learning from the unlabelled split (pseudo-labels from the first run) "
                   "[default: on].")
@click.option("--pretrain/--no-pretrain", default=None,
              help="That second run also pretrains single, dual, cross without labels [default: off; --tiny: on].")
def demo(out_dir, data_dir, category_map, models, splits, size, tiny, **options):
    """Generate a small dataset with known signals (or use --data), run extract, train-neural and stack
    on the CPU, package the model, predict the test split from it, and print the metric table, the
    per-kind accuracies and where each output went."""
    from dataclasses import replace
    from neural.models import parse_models
    from demo.run import DemoOptions, run_demo
    if (category_map or splits) and not data_dir:
        raise click.UsageError("--category-map and --split go with --data (the generated data brings its own)")
    if tiny and size not in ("small", "tiny"):
        raise click.UsageError(f"--tiny is --size tiny; it cannot go with --size {size}")
    alias = options.pop("unlabelled_alias")
    options["unlabelled"] = alias if options["unlabelled"] is None else options["unlabelled"]
    given = {k: v for k, v in options.items() if v is not None}
    options = replace(DemoOptions.sized("tiny" if tiny else size),
                      models=parse_models(models) if models else (), splits=splits, **given)
    run_demo(out_dir, data_dir, category_map, options, click.echo)


if __name__ == "__main__":
    cli()
