"""train-neural under torchrun (CPU, gloo): two processes give what one gives, bit for bit (predictions and
fold tensors); a rank killed with SIGKILL and the command rerun, at the same or another world size, ends
equal too; rows a rank left in a per-fold file are merged on resume; an error on rank 0 stops every rank."""
import os
import re
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from core.world import World
from neural import outputs, pipeline
from neural.checkpoint import fold_paths
from neural.distributed import rank_jobs
from neural.folds import load_folds
from neural.options import NeuralOptions
from neural.outputs import RunError
from neural.pipeline import train_neural
from tests.commands import REPO, RUN_PY, SUBPROCESS_ENV, cli_ok, rank_pid, start, subprocess_ok, torchrun
from tests.fakes import TINY

torch.set_num_threads(1)
MODELS = ("linear", "mlp", "vlad")
# --threads 1 on every rank: torch's CPU results change in the last bits with the thread count
FLAGS = ["--models", ",".join(MODELS), "--folds", "3", "--epochs", "2", "--hidden", "16", "--batch-size", "16",
         "--threads", "1"]


@pytest.fixture(scope="module")
def one_process(fake_cache, tmp_path_factory):
    """The reference: the same command in one process, no torchrun."""
    run = tmp_path_factory.mktemp("one") / "run"
    cli_ok(*train_args(fake_cache, run))
    return run


def train_args(cache, run):
    return ["train-neural", "--cache", cache, "--out", run] + FLAGS


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


def test_two_processes_give_the_same_predictions_and_fold_tensors_as_one(fake_cache, one_process, tmp_path):
    done = subprocess_ok(torchrun(2, RUN_PY, *train_args(fake_cache, tmp_path / "run")))
    assert_same_run(tmp_path / "run", one_process)
    lines = [line for line in done.stdout.splitlines() if "OOF mean-F1" in line]
    assert len(lines) == len(MODELS), done.stdout            # printed once, by the main rank
    fitted_by = set(re.findall(r"fold \d \(rank (\d)\)", done.stderr))           # the progress bars
    assert fitted_by == {"0", "1"}, "both ranks should have fitted folds"


@pytest.fixture(scope="module")
def killed_run(fake_cache, tmp_path_factory):
    """SIGKILL rank 1 of two as soon as its first fold checkpoint exists (it has three more jobs to go);
    torchrun stops the run. -> (run dir, {fold file: mtime} saved before the kill)."""
    run = tmp_path_factory.mktemp("killed") / "run"
    jobs = [(m, k) for m in MODELS for k in range(3)]
    first_of_rank1 = rank_jobs(jobs, World(rank=1, size=2))[0]
    marker = fold_paths(run / first_of_rank1[0], first_of_rank1[1])[1]
    launched = start(torchrun(2, RUN_PY, *train_args(fake_cache, run)))
    deadline, victim = time.monotonic() + 120, None
    while not marker.exists() and launched.poll() is None and time.monotonic() < deadline:
        victim = victim or rank_pid(launched.pid, 1)
        time.sleep(0.01)
    assert victim and marker.exists() and launched.poll() is None, "rank 1 was not caught mid-run"
    os.kill(victim, signal.SIGKILL)
    assert launched.wait(timeout=120) != 0
    assert not all(outputs.fold_done(run / m / "predictions.h5")[1] for m in MODELS), "the run had finished"
    return run


@pytest.mark.parametrize("rerun_nproc", [1, 2])
def test_a_rank_killed_mid_run_then_the_command_rerun_ends_equal(fake_cache, one_process, killed_run, tmp_path,
                                                               rerun_nproc):
    """The same command rerun (on a copy of the killed run) with `rerun_nproc` processes keeps every saved
    fold and ends equal to the one-process run; one process is this one."""
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    saved = {p: p.stat().st_mtime_ns for p in run.glob("*/fold*.safetensors")}
    assert saved, "rank 1 saved a fold before the kill"
    if rerun_nproc == 1:
        cli_ok(*train_args(fake_cache, run))
    else:
        subprocess_ok(torchrun(rerun_nproc, RUN_PY, *train_args(fake_cache, run)))
    assert_same_run(run, one_process)
    assert all(p.stat().st_mtime_ns == t for p, t in saved.items()), "a finished fold was trained again"


def test_rows_a_rank_left_in_a_per_fold_file_are_merged_on_resume_not_refitted(fake_cache, linear_run, tmp_path,
                                                                            monkeypatch):
    """A rank wrote fold 1's rows to oof_fold1.h5 and the run stopped before they were merged: the rerun
    merges them (no fit) and deletes the file, and a half-written one (.tmp) left by a killed rank."""
    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    opts = NeuralOptions(**TINY, threads=1)                     # linear_run's
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
    monkeypatch.setattr(pipeline, "fit_fold", lambda *a, **kw: fits.append(a[3]))
    train_neural(fake_cache, run, ["linear"], opts)
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


def test_an_error_on_rank_0_stops_every_rank_with_one_line(fake_cache, one_process, tmp_path):
    """A resumed run with other options is refused on rank 0; rank 1, waiting for the folds, stops too
    (RankError quoting it) instead of waiting at a barrier."""
    run = tmp_path / "run"
    train_neural(fake_cache, run, ["linear"], NeuralOptions(n_folds=3, epochs=1, hidden=16, lr=0.1, threads=1))
    started = time.monotonic()
    done = subprocess.run(torchrun(2, RUN_PY, *train_args(fake_cache, run)), env=SUBPROCESS_ENV, cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode != 0 and time.monotonic() - started < 120
    assert "Error: RunError:" in done.stderr and "lr: 0.1 -> 0.001" in done.stderr, done.stderr[-3000:]
    assert "Error: RankError: rank 0 stopped the run: RunError:" in done.stderr, done.stderr[-3000:]
