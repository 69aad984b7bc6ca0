"""The bench package as a suite (fast): `python -m bench list` names every module that declares a benchmark,
`python -m bench report` regenerates docs/results.md byte for byte from the JSON records, a record carries
what a reader needs to trust it, bench never imports the tests, and no tracked file outside tests holds an
absolute path of one machine."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import benchmarks
from bench.common import Table, measured, write_record
from bench.report import load_records, render

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def declaring_modules():
    """Modules whose source assigns BENCHMARK at top level, found by text, not by the package's own scan."""
    return sorted(p.stem for p in BENCH.glob("*.py") if re.search(r"^BENCHMARK = \{", p.read_text(), re.M))


def test_bench_list_names_every_module_that_declares_a_benchmark():
    out = subprocess.run([sys.executable, "-m", "bench", "list"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    listed = sorted(line.split()[0] for line in out.splitlines() if line.startswith("  "))
    assert listed == declaring_modules()
    assert {"extract", "predict", "scale", "heldout", "semi", "ucf14", "gpu_check"} <= set(listed)


def test_an_unknown_benchmark_is_refused_by_name():
    proc = subprocess.run([sys.executable, "-m", "bench", "no_such_thing"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "no benchmark 'no_such_thing'" in proc.stderr


def test_report_regenerates_the_results_page_identically_from_the_records():
    page = (REPO / "docs" / "results.md").read_text()
    records = load_records(BENCH / "results")
    assert render(records, benchmarks()) == page              # the committed page is the records' page
    assert render(load_records(BENCH / "results"), benchmarks()) == page     # and rendering is deterministic
    for name, record in records.items():                      # every record names its command, date, machine
        assert record["command"].startswith("python") and record["date"] and record["machine"]["cpu_count"], name


def test_a_record_written_by_a_run_is_rendered_on_the_page(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    with measured() as m:
        sum(range(10000))
    table = Table("a tiny table", ["pass", "seconds"], echo=False)
    table.add("sum", m.wall_s)
    path = write_record("extract", ["--n", "3"], [table], {"end-to-end / bare": 0.5}, ["a note"])
    record = json.loads(path.read_text())
    assert record["command"] == "python -m bench extract --n 3" and record["machine"]["cpu_count"] >= 1
    assert set(m.as_dict()) >= {"wall_s", "cpu_s", "peak_rss_mib"}
    page = render(load_records(tmp_path), benchmarks())
    assert "python -m bench extract --n 3" in page and "| sum |" in page and "end-to-end / bare: **0.5**" in page
    (tmp_path / "nobody.json").write_text("{}")
    with pytest.raises(SystemExit, match="nobody"):          # a record of no benchmark is refused by name
        render(load_records(tmp_path), benchmarks())


def test_bench_does_not_import_the_tests():
    offenders = [p.name for p in BENCH.glob("*.py") if re.search(r"^\s*(from|import) tests\b", p.read_text(), re.M)]
    assert offenders == []


def test_no_tracked_file_outside_tests_holds_an_absolute_machine_path():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to list tracked files with")
    out = subprocess.run(["git", "grep", "-nE", "/(work|tmp|home|root)/", "--", ".", ":!tests"], cwd=REPO,
                         capture_output=True, text=True).stdout
    assert out == ""


def test_a_record_names_no_folder_of_this_machine(monkeypatch, tmp_path):
    from bench.common import portable_arg
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "scratch"))
    assert portable_arg(str(tmp_path / "scratch" / "run")) == "$BENCH_CACHE/run"
    assert portable_arg(f"auto={tmp_path}/a/run,{tmp_path}/a/stack") == "auto=.../a/run,.../a/stack"
    assert portable_arg("../shared/data/fashion") == "../shared/data/fashion"
