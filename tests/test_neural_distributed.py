"""train-neural under torchrun (CPU, gloo): two processes give what one gives, bit for bit (predictions and
fold tensors); a rank killed with SIGKILL and the command rerun, at the same or another world size, ends
equal too; rows a rank left in a per-fold file are merged on resume; an error on rank 0 stops every rank."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from features.world import World
from neural import outputs, pipeline
from neural.checkpoint import fold_paths
from neural.distributed import rank_jobs
from neural.folds import load_folds
from neural.options import NeuralOptions
from neural.outputs import RunError
from neural.pipeline import train_neural
from run import cli
from tests.fakes import write_fake_store
from tests.test_neural import add_aggregates

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
MODELS = ("linear", "mlp", "vlad")
# --threads 1 on every rank: torch's CPU results change in the last bits with the thread count
FLAGS = ["--models", ",".join(MODELS), "--folds", "3", "--epochs", "2", "--hidden", "16", "--batch-size", "16",
         "--threads", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A labelled and a test store, with aggregates and a codebook (the vlad and mlp models need them)."""
    d = tmp_path_factory.mktemp("dist") / "cache"
    d.mkdir()
    write_fake_store(d / "labeled.h5", n=60)
    write_fake_store(d / "test.h5", n=20, split="test", labelled=False, seed=1)
    add_aggregates(d, ["labeled", "test"])
    return d


@pytest.fixture(scope="module")
def one_process(cache, tmp_path_factory):
    """The reference: the same command in one process, no torchrun."""
    run = tmp_path_factory.mktemp("one") / "run"
    result = CliRunner().invoke(cli, ["train-neural", "--cache", str(cache), "--out", str(run)] + FLAGS)
    assert result.exit_code == 0, result.output
    return run


def command(cache, run, nproc):
    """train-neural under torchrun with nproc ranks, or plainly (one process) for nproc == 1."""
    base = [str(ROOT / "run.py"), "train-neural", "--cache", str(cache), "--out", str(run)] + FLAGS
    if nproc == 1:
        return [sys.executable] + base
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"] + base


def run_command(cache, run, nproc):
    done = subprocess.run(command(cache, run, nproc), cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True)
    return done


def assert_same_run(run, reference):
    """Every model: OOF and test probabilities, per-fold metrics and every fold tensor equal, bit for bit;
    no per-fold rows file left behind."""
    for model in MODELS:
        with h5py.File(run / model / "predictions.h5", "r") as got, \
                h5py.File(reference / model / "predictions.h5", "r") as want:
            assert got.attrs["complete"]
            for name in ("oof_proba", "proba/test", "fold_done"):
                np.testing.assert_array_equal(got[name][:], want[name][:], err_msg=f"{model} {name}")
        assert outputs.read_metrics(run / model / "predictions.h5")["oof"] == \
            outputs.read_metrics(reference / model / "predictions.h5")["oof"]
        for k in range(3):
            got, want = (load_file(str(fold_paths(d / model, k)[0])) for d in (run, reference))
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{model} fold {k} {name}")
        assert not list((run / model).glob("oof_fold*")), "a per-fold rows file was left behind"


def test_jobs_are_dealt_round_robin_so_each_runs_on_exactly_one_rank():
    jobs = [(m, k) for m in MODELS for k in range(5)]
    for size in (1, 2, 3, 8, 20):
        shares = [rank_jobs(jobs, World(rank=r, size=size)) for r in range(size)]
        assert sorted(j for share in shares for j in share) == sorted(jobs)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert rank_jobs(jobs, World()) == jobs                       # one process: every job, in order


def test_two_processes_give_the_same_predictions_and_fold_tensors_as_one(cache, one_process, tmp_path):
    done = run_command(cache, tmp_path / "run", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "run", one_process)
    lines = [line for line in done.stdout.splitlines() if "OOF mean-F1" in line]
    assert len(lines) == len(MODELS), done.stdout            # printed once, by the main rank
    fitted_by = set(re.findall(r"fold \d \(rank (\d)\)", done.stderr))           # the progress bars
    assert fitted_by == {"0", "1"}, "both ranks should have fitted folds"


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
    for pid in descendants(torchrun_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.parametrize("rerun_nproc", [1, 2])
def test_a_rank_killed_mid_run_then_the_command_rerun_ends_equal(cache, one_process, tmp_path, rerun_nproc):
    """SIGKILL rank 1 as soon as its first fold checkpoint exists (it has three more jobs to go); torchrun
    stops the run; the same command rerun with `rerun_nproc` processes keeps every saved fold and ends
    equal to the one-process run."""
    run = tmp_path / "run"
    jobs = [(m, k) for m in MODELS for k in range(3)]
    first_of_rank1 = rank_jobs(jobs, World(rank=1, size=2))[0]
    marker = fold_paths(run / first_of_rank1[0], first_of_rank1[1])[1]
    launched = subprocess.Popen(command(cache, run, 2), cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, victim = time.monotonic() + 120, None
    while not marker.exists() and launched.poll() is None and time.monotonic() < deadline:
        victim = victim or rank_pid(launched.pid, 1)
        time.sleep(0.01)
    assert victim and marker.exists() and launched.poll() is None, "rank 1 was not caught mid-run"
    os.kill(victim, signal.SIGKILL)
    assert launched.wait(timeout=120) != 0
    assert not all(outputs.fold_done(run / m / "predictions.h5")[1] for m in MODELS), "the run had finished"
    saved = {p: p.stat().st_mtime_ns for p in run.glob("*/fold*.safetensors")}

    done = run_command(cache, run, rerun_nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run, one_process)
    assert all(p.stat().st_mtime_ns == t for p, t in saved.items()), "a finished fold was trained again"


def test_rows_a_rank_left_in_a_per_fold_file_are_merged_on_resume_not_refitted(cache, one_process, tmp_path,
                                                                            monkeypatch):
    """A rank wrote fold 1's rows to oof_fold1.h5 and the run stopped before they were merged: the rerun
    merges them (no fit) and deletes the file, and a half-written one (.tmp) left by a killed rank."""
    run = tmp_path / "run"
    opts = NeuralOptions(n_folds=3, epochs=2, hidden=16, batch_size=16, threads=1)
    train_neural(cache, run, ["linear"], opts)
    preds = run / "linear" / "predictions.h5"
    with h5py.File(preds, "r+") as h5:
        oof, done = h5["oof_proba"][:], h5["fold_done"][:]
        _, fold, _, _ = load_folds(run / "folds.h5")
        held = np.flatnonzero(fold == 1)
        outputs.write_fold_rows(outputs.fold_rows_path(run / "linear", 1), 1, held, oof[held])
        h5["oof_proba"][held] = np.zeros_like(oof[held])
        h5["fold_done"][1] = False
        h5.attrs["complete"] = False
    half_written = run / "linear" / "oof_fold2.h5.tmp"               # a rank killed while writing its rows
    half_written.write_bytes(b"\x89HDF")
    fits = []
    monkeypatch.setattr(pipeline, "fit_fold", lambda *a, **kw: fits.append(a[4]))
    train_neural(cache, run, ["linear"], opts)
    assert fits == [] and not list((run / "linear").glob("oof_fold*"))
    with h5py.File(preds, "r") as h5:
        np.testing.assert_array_equal(h5["oof_proba"][:], oof)
        np.testing.assert_array_equal(h5["fold_done"][:], done)


def test_a_per_fold_rows_file_of_other_rows_or_another_fold_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "oof_fold1.h5"
    held = np.array([1, 4, 7])
    outputs.write_fold_rows(path, 1, held, np.full((3, 6), 1 / 6, np.float32))
    assert outputs.read_fold_rows(path, 1, held, 6).shape == (3, 6)
    with pytest.raises(RunError, match=r"oof_fold1.h5: attribute 'fold' is 1, expected 2"):
        outputs.read_fold_rows(path, 2, held, 6)
    with pytest.raises(RunError, match=r"oof_fold1.h5: field 'positions'"):
        outputs.read_fold_rows(path, 1, np.array([1, 4, 8]), 6)
    with pytest.raises(RunError, match=r"oof_fold1.h5: field 'oof_proba' has shape \(3, 6\)"):
        outputs.read_fold_rows(path, 1, held, 5)


def test_an_error_on_rank_0_stops_every_rank_with_one_line(cache, one_process, tmp_path):
    """A resumed run with other options is refused on rank 0; rank 1, waiting for the folds, stops too
    (RankError quoting it) instead of waiting at a barrier."""
    run = tmp_path / "run"
    train_neural(cache, run, ["linear"], NeuralOptions(n_folds=3, epochs=1, hidden=16, lr=0.1, threads=1))
    started = time.monotonic()
    done = run_command(cache, run, 2)
    assert done.returncode != 0 and time.monotonic() - started < 120
    assert "Error: RunError:" in done.stderr and "lr: 0.1 -> 0.001" in done.stderr, done.stderr[-3000:]
    assert "Error: RankError: rank 0 stopped the run: RunError:" in done.stderr, done.stderr[-3000:]
