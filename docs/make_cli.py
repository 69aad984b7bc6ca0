"""Writes docs/cli.md, every command's options, from the commands themselves: `python docs/make_cli.py`.

tests/test_docs.py fails when docs/cli.md is not what this prints, so the page cannot drift from `--help`.
"""
import inspect
from pathlib import Path

import click

PAGE = Path(__file__).with_name("cli.md")


def option_rows(command):
    """One markdown row per option of `command`: its flags, default and help."""
    ctx = click.Context(command, info_name=command.name)
    rows = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None or param.name == "help":      # hidden options, --help itself
            continue
        flags, help_text = record
        rows.append(f"| `{flags}` | {help_text.replace('|', '/')} |")
    return rows


def paragraph(text):
    """A docstring as one markdown paragraph."""
    return " ".join(inspect.cleandoc(text or "").split())


def cli_markdown(group):
    """The whole page: the group's help, then a section per command, in the order the pipeline runs them."""
    ctx = click.Context(group, info_name="python run.py")
    lines = ["# Command reference", "",
             "Generated from the commands by `python docs/make_cli.py`; do not edit by hand. "
             "How each command works: [guide.md](guide.md).", "", paragraph(group.help), ""]
    order = ["extract", "train-neural", "stack", "predict", "demo"]
    names = sorted(group.list_commands(ctx), key=lambda n: (order.index(n) if n in order else len(order), n))
    for name in names:
        command = group.get_command(ctx, name)
        lines += [f"## {name}", "", "```", f"python run.py {name} [OPTIONS]", "```", "",
                  paragraph(command.help), "", "| option | what it does |", "|---|---|",
                  *option_rows(command), ""]
    return "\n".join(lines).rstrip() + "\n"


def main():
    from run import cli
    PAGE.write_text(cli_markdown(cli), encoding="utf-8")
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
