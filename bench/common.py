"""What every benchmark shares: one timer with peak memory, the machine it ran on, markdown tables that
are printed as they fill, and the one JSON record per benchmark that docs/results.md is generated from.

A record (bench/results/<name>.json) holds the command, the UTC date, the git commit, the machine (CPU
count and model, torch threads, GPU, load average), the benchmark's tables and the ratios it measured
side by side in the same run. A run replaces its benchmark's record: git keeps the history.

Paths: data and scratch directories are arguments; their defaults live under the working directory
(BENCH_CACHE, default ./bench_cache/) or next to the repository (BENCH_DATA, default ../shared/data).
BENCH_RESULTS moves the records (e.g. for a smoke run that must not replace the current ones).
"""
import json
import os
import re
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def results_dir():
    """Where the records go: BENCH_RESULTS, else bench/results/ of this checkout."""
    return Path(os.environ.get("BENCH_RESULTS") or REPO / "bench" / "results")


def cache_dir(*parts):
    """A scratch directory for generated stores and runs: BENCH_CACHE (default ./bench_cache) / parts."""
    return Path(os.environ.get("BENCH_CACHE") or "bench_cache", *parts)


def data_dir(*parts):
    """The shared real data: BENCH_DATA (default ../shared/data beside this repository) / parts."""
    return Path(os.environ.get("BENCH_DATA") or REPO.parent / "shared" / "data", *parts)


# ------------------------------------------------------------------ timing and memory


def peak_rss_mib():
    """This process's peak resident memory in MiB (VmHWM: unlike ru_maxrss it is not inherited over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux reports KiB


class Measured:
    """The figures of one `measured()` block: wall and CPU seconds, peak RSS, Python-heap peak."""

    def __init__(self):
        self.wall_s = self.cpu_s = self.peak_rss_mib = None
        self.python_peak_mib = None                   # only with measured(python_heap=True)

    def as_dict(self):
        return {k: round(v, 3) for k, v in vars(self).items() if v is not None}


@contextmanager
def measured(python_heap=False):
    """Time a block: wall (perf_counter), CPU of this process and its reaped children (user + system),
    the process's peak RSS at the end, and with python_heap=True tracemalloc's peak of Python objects
    (slower; the RSS includes torch's and the allocator's memory, tracemalloc only Python's)."""
    out = Measured()
    if python_heap:
        tracemalloc.start()
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    try:
        yield out
    finally:
        out.wall_s = time.perf_counter() - wall0
        out.cpu_s = _cpu_seconds() - cpu0
        out.peak_rss_mib = peak_rss_mib()
        if python_heap:
            out.python_peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()


def _cpu_seconds():
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def run_child(argv, env, log, cwd=REPO, stop_when=None):
    """Run one child process with its output in `log`: -> Measured (wall, CPU and peak RSS of that child
    alone, from os.wait4). With `stop_when` (a path) the child is terminated once that file exists and the
    wall time is taken then. A failed child raises SystemExit naming the log and its last lines."""
    out = Measured()
    started, stopped = time.perf_counter(), False
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, 0 if stop_when is None else os.WNOHANG)
            if pid:                                   # it ended (reaped here, so its rusage is its own)
                break
            if not stopped and Path(stop_when).exists():
                out.wall_s, stopped = time.perf_counter() - started, True
                proc.terminate()
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)     # so Popen does not wait for it again
    if not stopped:
        out.wall_s = time.perf_counter() - started
    if proc.returncode and not stopped:
        tail = Path(log).read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"{argv[1] if len(argv) > 1 else argv[0]}: failed (exit {proc.returncode}); "
                         f"see {log}:\n" + "\n".join(tail))
    out.cpu_s = usage.ru_utime + usage.ru_stime
    out.peak_rss_mib = usage.ru_maxrss / 1024                    # Linux reports KiB
    return out


def limit_threads(threads, env=None):
    """Set the BLAS/OpenMP thread variables (in `env`, else this process's environment) and return it."""
    env = os.environ if env is None else env
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def child_env(threads=None):
    """The environment for a child that runs this checkout's code (PYTHONPATH = the repository)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return limit_threads(threads, env) if threads else env


# ------------------------------------------------------------------ the machine and the code


def machine():
    """What a reader needs to compare figures: CPUs, torch's threads, the GPU, the load at the start."""
    info = {"cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    """HEAD of this checkout, with '+changes' when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


# ------------------------------------------------------------------ tables and the record


class Table:
    """A markdown table printed row by row as it is measured, and kept for the record."""

    def __init__(self, title, columns, echo=True):
        self.title, self.columns, self.rows, self.echo = title, list(columns), [], echo
        if echo:
            print(f"\n{title}\n| " + " | ".join(self.columns) + " |\n|" + "---|" * len(self.columns), flush=True)

    def add(self, *cells):
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r}: a row of {len(cells)} cells for {len(self.columns)} columns")
        row = [fmt(c) for c in cells]
        self.rows.append(row)
        if self.echo:
            print("| " + " | ".join(row) + " |", flush=True)

    def as_dict(self):
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


def fmt(value, digits=4):
    """A cell: floats to `digits` decimals (3 significant places at least for small ones), the rest as str."""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return str(value)


def portable_arg(arg):
    """A command-line argument as the record shows it: paths under this machine's scratch, data or working
    directories written as $BENCH_CACHE/..., $BENCH_DATA/... or relative, so no record names one machine's
    folders; any other absolute path keeps only its last two parts behind '...'."""
    text = str(arg)
    roots = [(cache_dir().resolve(), "$BENCH_CACHE"), (data_dir().resolve(), "$BENCH_DATA"),
             (Path.cwd().resolve(), ".")]
    def one(token):
        if not token.startswith("/"):
            return token
        for root, name in roots:
            if token == str(root) or token.startswith(str(root) + "/"):
                return name + token[len(str(root)):]
        return ".../" + "/".join(Path(token).parts[-2:])
    return re.sub(r"/[^\s,=:;'\"]+", lambda m: one(m.group(0)) if m.start() == 0 or m.string[m.start() - 1] in " ,=:;'\"" else m.group(0), text)


def write_record(name, argv, tables, ratios=None, notes=(), extra=None, variant=None):
    """bench/results/<name>.json (<name>.<variant>.json for one of a benchmark's modes, e.g. knn.search):
    the one current record of that benchmark or mode, replaced by each run.

    argv: the arguments after `python -m bench NAME`; tables: Table objects (or their dicts); ratios:
    {what: value} measured side by side in this run; notes: short sentences a reader needs to trust the
    figures (protocol, bands, what a column means)."""
    record = {
        "name": name if variant is None else f"{name}.{variant}",
        "command": " ".join(["python -m bench", name, *map(portable_arg, argv or [])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "machine": machine(),
        "tables": [t.as_dict() if isinstance(t, Table) else t for t in tables],
        "ratios": {k: round(float(v), 4) for k, v in (ratios or {}).items()},
        "notes": list(notes),
    }
    if extra:
        record.update(extra)
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['name']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"record: {path}")
    return path
