"""The package as a user meets it: the console script, `python -m bnpipe`, help, dependencies."""

import subprocess
import sys
from importlib import metadata

import click
import pytest
from click.testing import CliRunner

from bnpipe import __version__
from bnpipe.cli import COMMANDS, cli


def test_python_dash_m_prints_version() -> None:
    out = subprocess.run([sys.executable, "-m", "bnpipe", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"bnpipe, version {__version__}"
    assert metadata.version("bnpipe") == __version__


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_defaults(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "Usage: " in result.output and "[default:" in result.output


def test_cpu_onnxruntime_is_not_installed_next_to_the_gpu_build() -> None:
    assert metadata.version("onnxruntime-gpu")
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("onnxruntime")  # both ship the same module; the CUDA provider then breaks


@pytest.mark.parametrize(("args", "command", "named"), [
    (["frobnicate"], "bnpipe", "No such command 'frobnicate'"),
    (["--bogus"], "bnpipe", "No such option '--bogus'"),
    (["train", "--epochs", "0"], "bnpipe train", "'--epochs': 0 is not in the range"),
    (["predict", "--device", "gpu", "x.png"], "bnpipe predict", "'--device': 'gpu' is not one of"),
    (["fold", "in.onnx"], "bnpipe fold", "Missing argument 'OUT.onnx'"),
])
def test_usage_error_is_one_line_naming_the_thing(args: list[str], command: str, named: str) -> None:
    result = CliRunner().invoke(cli, args, prog_name="bnpipe")
    assert result.exit_code == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("bnpipe: error: ") and named in line and line.endswith(f"(see '{command} --help')")


def test_console_script_usage_error_is_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "bnpipe", "train", "--epochs", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("bnpipe: error: Invalid value for '--epochs': 0 is not in the range x>=1 "
                          "(see 'bnpipe train --help')\n")


def test_no_arguments_still_show_the_help() -> None:
    result = CliRunner().invoke(cli, [], prog_name="bnpipe")
    assert result.exit_code == 2 and result.stderr.startswith("Usage: bnpipe [OPTIONS] COMMAND")
    assert "Commands:" in result.stderr and ": error:" not in result.stderr


@pytest.mark.parametrize("args", [["--version"], ["fold", "--help"], ["fold", "x.onnx"]])
def test_a_full_stdout_is_one_line_not_a_traceback(args: list[str]) -> None:
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        out = subprocess.run([sys.executable, "-m", "bnpipe", *args], stdout=full, stderr=subprocess.PIPE, text=True)
    if args == ["fold", "x.onnx"]:  # a usage error goes to stderr: the full stdout is never written
        assert out.returncode == 2 and out.stderr.startswith("bnpipe: error: Missing argument"), out.stderr
        return
    assert (out.returncode, out.stderr) == (1, "bnpipe: error: cannot write output: No space left on device\n")


@click.command()
def _interrupted() -> None:
    raise KeyboardInterrupt


def test_ctrl_c_exits_130_as_the_shell_expects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(COMMANDS, "interrupted", f"{__name__}:_interrupted")
    result = CliRunner().invoke(cli, ["interrupted"], prog_name="bnpipe")
    assert result.exit_code == 130 and "Aborted" not in result.output
