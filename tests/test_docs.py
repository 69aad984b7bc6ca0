"""The front door stays true: the README is a short guide without dates, and docs/cli.md is what `--help`
says. (Every option having help: tests/test_options.py; no machine paths: tests/test_bench_suite.py.)"""
import importlib.util
import re
from pathlib import Path

from run import cli

ROOT = Path(__file__).resolve().parents[1]


def _make_cli():
    spec = importlib.util.spec_from_file_location("make_cli", ROOT / "docs" / "make_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_a_short_guide_without_dates_or_commit_hashes():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    dated = [l for l in lines if re.search(r"\b20\d\d-\d\d-\d\d\b", l)]
    hashes = [l for l in lines if re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", l)]
    assert not dated, dated
    assert not hashes, hashes


def test_docs_cli_md_is_what_the_commands_say():
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert page == _make_cli().cli_markdown(cli), "docs/cli.md is stale: run `python docs/make_cli.py`"
