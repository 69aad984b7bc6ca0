"""The benchmarks and quality experiments, one entry point: `python -m bench list | NAME [args] | report`.

A module of this package is a benchmark when it declares, at module level,
    BENCHMARK = {"kind": "speed" | "quality" | "data" | "gpu", "summary": "one line"}
and defines main(argv). Its runs write bench/results/<name>.json (bench.common.write_record), and
`python -m bench report` generates docs/results.md from those records.
"""
