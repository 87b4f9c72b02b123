"""The package as a user meets it: the console script, `python -m bnpipe`, help, dependencies."""

import subprocess
import sys
from importlib import metadata

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


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == 2 and "No such command" in result.output
