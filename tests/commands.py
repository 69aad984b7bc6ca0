"""Running the command line from tests: in this process (click's runner: no torch import, no encoder
load to pay again) or as a subprocess (a real process to kill, or torchrun's ranks), and finding the
ranks torchrun started."""
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
RUN_PY = REPO / "run.py"
# one thread per process: subprocesses beside the test process (or torchrun's ranks beside each other)
# share the cores; torch's CPU results are the same at one thread in every process
SUBPROCESS_ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def invoke(*args):
    """`run.py ARGS` in this process; an exception other than click's exit is raised, not swallowed."""
    from run import cli
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exit_code != 0 and result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def cli_ok(*args):
    """`run.py ARGS` in this process, which must succeed; -> click's Result (its .output)."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


# the smallest CLI pipeline that still runs every stage: 4 frames of 16-d features, mlp and vlad, 3 folds
EXTRACT = ["--frames", "4", "--max-tokens", "16", "--batch-size", "16", "--workers", "0", "--device", "cpu",
           "--pca-dim", "8", "--clusters", "4", "--gmm-components", "2", "--codebook-sample", "400"]
TRAIN = ["--models", "mlp,vlad", "--folds", "3", "--epochs", "1", "--hidden", "16", "--batch-size", "16",
         "--threads", "1", "--workers", "0"]
STACK = ["--param", "n_rounds=10", "--param", "top_k=3", "--compare", "", "--threads", "1"]


def cli_pipeline(root, signal, tail_ratio):
    """extract -> train-neural -> stack through the CLI on 36 labelled and 8 test videos of 4 classes (feature
    zips) under root; -> {root, data, cache, run, stack: paths, stacked: the stack command's Result}."""
    from demo.synthetic import generate_feature_zip_dataset
    paths = {"root": root, "data": root / "data", "cache": root / "cache", "run": root / "run",
             "stack": root / "stack"}
    generate_feature_zip_dataset(paths["data"], 36, n_frames=4, dim=16, split="labeled", n_classes=4,
                                 signal=signal, tail_ratio=tail_ratio, progress=False)
    generate_feature_zip_dataset(paths["data"], 8, n_frames=4, dim=16, split="test", n_classes=4,
                                 with_labels=False, progress=False)
    cli_ok("extract", "--data", paths["data"], "--out", paths["cache"], *EXTRACT)
    cli_ok("train-neural", "--cache", paths["cache"], "--out", paths["run"], *TRAIN)
    return {**paths, "stacked": cli_ok("stack", "--run", paths["run"], "--out", paths["stack"], *STACK)}


def run_py(*args):
    """argv of `python run.py ARGS` (a process of its own)."""
    return [sys.executable, str(RUN_PY), *map(str, args)]


def torchrun(nproc, script, *args):
    """argv of `SCRIPT ARGS` under torchrun with nproc ranks on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(script), *map(str, args)]


def subprocess_ok(argv, timeout=600):
    """Run argv to its end; it must succeed. -> CompletedProcess with text stdout and stderr."""
    done = subprocess.run(argv, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start(argv):
    """Start argv without waiting (to be killed); its output is discarded."""
    return subprocess.Popen(argv, env=SUBPROCESS_ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def descendants(pid):
    """Process ids below `pid` (Linux /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pid(torchrun_pid, rank):
    """The pid of torchrun's worker with RANK=rank, or None while it has not started."""
    for pid in descendants(torchrun_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None
