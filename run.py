"""Command line: each command parses its options and calls one function."""
import dataclasses

import click


@click.group()
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
@click.option("--max-tokens", default=128, show_default=True, help="Tokens of the joined text kept.")
@click.option("--frames-from", type=click.Choice(["auto", "zip", "npy", "video"]), default="auto", show_default=True)
@click.option("--limit", type=int, help="Only the first N videos of each split.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--workers", default=2, show_default=True, help="Processes decoding frames and tokenising.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="skip: mask a video's bad media, count and report it; fail: stop at the first.")
@click.option("--overwrite", is_flag=True, help="Rebuild stores made with other encoders or options.")
def extract(data_dir, splits, cache_dir, **options):
    """Cache frame and text embeddings (and video aggregates) in one HDF5 store per split."""
    from features.extract import ExtractOptions, extract as run_extract, list_splits
    opts = ExtractOptions(**options)
    reports = run_extract(data_dir, list(splits) or list_splits(data_dir), cache_dir, opts)
    for split, report in reports.items():
        click.echo(f"{split}: {report['n_videos']} videos, {report['n_videos_with_faults']} with media faults "
                   f"-> {report['store']} (report: {split}.report.json)")


if __name__ == "__main__":
    cli()
