"""python -m bench list | report | NAME [args...]  (NAME --help: that benchmark's own options)."""
import ast
import importlib
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
KINDS = {"speed": "speed and memory", "quality": "quality experiments (protocols on real data)",
         "data": "data preparation for the experiments", "gpu": "GPU check"}


def declared(path):
    """The BENCHMARK dict a module declares at top level (read without importing it), or None."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BENCHMARK" for t in node.targets):
            value = ast.literal_eval(node.value)
            if set(value) != {"kind", "summary"} or value["kind"] not in KINDS:
                raise SystemExit(f"{path}: BENCHMARK must be {{'kind': one of {sorted(KINDS)}, 'summary': ...}}")
            return value
    return None


def benchmarks():
    """{name: BENCHMARK} of every module in bench/ that declares one, by name."""
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        value = declared(path)
        if value is not None:
            found[path.stem] = value
    return found


def list_benchmarks():
    found = benchmarks()
    for kind, title in KINDS.items():
        names = [n for n, v in found.items() if v["kind"] == kind]
        if names:
            print(f"{title}:")
            for name in names:
                print(f"  {name:<26} {found[name]['summary']}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        list_benchmarks()
        return
    name, rest = argv[0], argv[1:]
    if name == "list":
        list_benchmarks()
    elif name == "report":
        from bench.report import main as report
        report(rest)
    elif name in benchmarks():
        raise SystemExit(importlib.import_module(f"bench.{name}").main(rest))
    else:
        raise SystemExit(f"python -m bench: no benchmark {name!r}; `python -m bench list` names them")


if __name__ == "__main__":
    main()
