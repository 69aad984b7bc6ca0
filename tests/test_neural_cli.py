"""train-neural through the command line: one-line errors for bad model lists, a run end to end, and a
run killed with SIGKILL then rerun ends with the same out-of-fold predictions as an uninterrupted one."""
import signal
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neural import outputs
from neural.checkpoint import fold_saved
from neural.models import MODEL_NAMES
from run import cli
from tests.commands import cli_ok, run_py, start

torch.set_num_threads(1)
TINY = ["--folds", "3", "--epochs", "2", "--hidden", "16", "--batch-size", "16", "--threads", "1"]


@pytest.mark.parametrize("models, says", [("single,nosuch", "unknown model(s) 'nosuch'"),
                                          ("", "no model named in ''"), (" , ", "no model named in ' , '")])
def test_a_bad_model_list_is_one_line_naming_the_known_models(fake_cache, tmp_path, models, says):
    result = CliRunner().invoke(cli, ["train-neural", "--cache", str(fake_cache), "--out", str(tmp_path / "run"),
                                      "--models", models])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and ", ".join(MODEL_NAMES) in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_bad_options_are_one_line_errors(fake_cache, tmp_path):
    result = CliRunner().invoke(cli, ["train-neural", "--cache", str(fake_cache), "--out", str(tmp_path / "run"),
                                      "--models", "linear", "--folds", "1"])
    assert result.exit_code != 0 and result.output.strip() == "Error: OptionsError: n_folds must be at least 2, got 1"


def test_train_neural_from_the_command_line_writes_the_run_directory(fake_cache, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train-neural", "--cache", str(fake_cache), "--out", str(run),
                                      "--models", "linear"] + TINY)
    assert result.exit_code == 0, result.output
    assert "linear: OOF mean-F1" in result.output and f"-> {run}/linear/predictions.h5" in result.output
    assert (run / "run.json").exists() and (run / "folds.h5").exists()
    assert all(fold_saved(run / "linear", k) for k in range(3))
    assert sorted(p.name for p in (run / "linear").iterdir()) == sorted(
        ["predictions.h5"] + [f"fold{k}{s}" for k in range(3) for s in (".safetensors", ".json")])


def train_args(cache, run, epochs):
    return ["train-neural", "--cache", cache, "--out", run, "--models", "linear", "--folds", "3",
            "--epochs", epochs, "--batch-size", "8", "--threads", "1"]


def test_train_neural_killed_with_sigkill_then_rerun_gives_the_same_oof(fake_cache, tmp_path):
    """A real kill -9 of a process in the middle of fold 1 (after fold 0's checkpoint): the rerun (in this
    process, the same command) resumes and its out-of-fold predictions equal those of an uninterrupted run
    (in this process too), bit for bit."""
    epochs = 40
    killed = start(run_py(*train_args(fake_cache, tmp_path / "killed", epochs)))
    deadline = time.monotonic() + 120
    while not fold_saved(tmp_path / "killed" / "linear", 0) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)                                          # into fold 1's training
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed: raise epochs"
    assert not fold_saved(tmp_path / "killed" / "linear", 2)
    cli_ok(*train_args(fake_cache, tmp_path / "killed", epochs))
    cli_ok(*train_args(fake_cache, tmp_path / "straight", epochs))
    straight, _ = outputs.read_oof(tmp_path / "straight" / "linear" / "predictions.h5")
    resumed, _ = outputs.read_oof(tmp_path / "killed" / "linear" / "predictions.h5")
    np.testing.assert_array_equal(resumed, straight)
