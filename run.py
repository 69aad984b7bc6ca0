"""Command line: each command parses its options and calls one function."""
import click


@click.group()
def cli():
    """Multimodal short-video classifier: extract -> train-neural -> stack -> predict."""


if __name__ == "__main__":
    cli()
