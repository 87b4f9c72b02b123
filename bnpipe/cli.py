"""The `bnpipe` command group.

Each stage's command lives in its own package (`bnpipe.train.cli`, `bnpipe.export.cli`,
`bnpipe.serve.cli`) and is imported only when it runs, so `bnpipe predict` never pays for
importing torch.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import sys
from collections.abc import Iterator
from typing import IO, Any

import click
from click.exceptions import NoArgsIsHelpError

from bnpipe import __version__
from bnpipe.errors import BnpipeError, output_error

# command name -> "module:attribute" of its click command
COMMANDS: dict[str, str] = {
    "train": "bnpipe.train.cli:train",
    "export": "bnpipe.export.cli:export",
    "fold": "bnpipe.export.fold_cli:fold",
    "predict": "bnpipe.serve.cli:predict",
    "samples": "bnpipe.serve.samples:samples",
    "serve": "bnpipe.serve.server_cli:serve",
}


class UsageLine(click.UsageError):
    """A usage error shown as one line, as bnpipe's other errors: what is wrong, and the command's help.

    Click's own display is three lines (usage, a hint, then the error); a Unix tool says one.
    """

    def __init__(self, exc: click.UsageError) -> None:
        super().__init__(exc.format_message(), exc.ctx)  # BadParameter and kin format their own text

    def show(self, file: IO[Any] | None = None) -> None:
        """Write ``bnpipe: error: MESSAGE (see 'bnpipe CMD --help')`` to stderr."""
        path = self.ctx.command_path if self.ctx is not None else "bnpipe"
        click.echo(f"bnpipe: error: {self.message.removesuffix('.')} (see '{path} --help')", file=file, err=True)


@contextlib.contextmanager
def usage_line() -> Iterator[None]:
    """Turn a click usage error raised inside into `UsageLine`."""
    try:
        yield
    except (UsageLine, NoArgsIsHelpError):  # the latter is the help itself, asked for by no arguments
        raise
    except click.UsageError as exc:
        raise UsageLine(exc) from None


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The command names, in the order of the pipeline."""
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import and return the command ``cmd_name``, or None for an unknown name."""
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        """Parse the group's own options; a usage error there is one line."""
        with usage_line():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> object:
        """Run the command; a usage error or a ``BnpipeError`` is one line on stderr and an exit code."""
        # Library code raises BnpipeError for bad input; the user gets one line, never a traceback.
        try:
            with usage_line():  # a subcommand's own options, and an unknown command
                return super().invoke(ctx)
        except BnpipeError as exc:
            click.echo(f"bnpipe: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:  # Ctrl-C: the shell's status for SIGINT, not click's "Aborted!" and 1
            click.echo(err=True)
            ctx.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, "-V", "--version", prog_name="bnpipe")
def cli() -> None:
    """Train a BatchNorm conv net on MNIST, fold BN into ONNX exactly, and predict with onnxruntime."""


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="bnpipe")
    except OSError as exc:
        # click.echo flushes each line, so stdout on a full disk (/dev/full) fails inside a command.
        # Files are written through bnpipe.atomic, which names them; an OSError with no file name
        # and a write's errno is the output stream's: one line, as predict says it.
        if exc.filename is not None or exc.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG):
            raise
        click.echo(f"bnpipe: error: {output_error(sys.stdout, exc)}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
