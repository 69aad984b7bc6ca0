"""One vocabulary across the commands: every option has help, --version, the installed console command, and the
renamed options (stack --run, demo --unlabeled) keep their old spellings as hidden aliases."""
from importlib import metadata

import click
import pytest
from click.testing import CliRunner

from run import cli


def _commands():
    ctx = click.Context(cli)
    return [(name, cli.get_command(ctx, name)) for name in cli.list_commands(ctx)]


@pytest.mark.parametrize("name,command", _commands(), ids=[n for n, _ in _commands()])
def test_every_option_of_every_command_has_help(name, command):
    missing = [p.opts[0] for p in command.params
               if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert not missing, f"{name}: options without help: {missing}"


def test_version_prints_the_installed_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and metadata.version("shortvideo-classifier") in result.output


def test_the_console_command_is_the_same_cli():
    # every installed copy's metadata: a stale in-tree *.egg-info (ignored build output) can shadow the install's
    found = [ep for dist in metadata.distributions() if dist.metadata["Name"] == "shortvideo-classifier"
             for ep in dist.entry_points if ep.group == "console_scripts" and ep.name == "shortvideo"]
    assert found, "no console_scripts entry point 'shortvideo': reinstall with pip install -e ."
    assert found[0].load() is cli


def test_stack_takes_the_run_directory_as_run_and_still_as_model(tmp_path):
    import run
    seen = []
    command = cli.get_command(click.Context(cli), "stack")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(command, "callback", lambda run_dir, run_dir_alias, **_: seen.append(run_dir or run_dir_alias))
        for flag in ("--run", "--model"):
            assert CliRunner().invoke(cli, ["stack", flag, str(tmp_path), "--out", str(tmp_path / "s")]).exit_code == 0
    assert seen == [str(tmp_path)] * 2
    help_text = CliRunner().invoke(cli, ["stack", "--help"]).output
    assert "--run DIRECTORY" in help_text and "--model " not in help_text
    missing = CliRunner().invoke(cli, ["stack", "--out", str(tmp_path / "s")])
    assert missing.exit_code == 2 and "Missing option '--run'" in missing.output
    assert run.cli is cli


def test_demo_spells_unlabeled_as_train_neural_does_and_keeps_the_old_spelling_hidden():
    help_text = CliRunner().invoke(cli, ["demo", "--help"]).output
    assert "--unlabeled / --no-unlabeled" in help_text and "--unlabelled" not in help_text
    demo = cli.get_command(click.Context(cli), "demo")
    ctx = demo.make_context("demo", ["--no-unlabelled"])
    assert ctx.params["unlabelled_alias"] is False and ctx.params["unlabelled"] is None
