"""The `bnpipe` command group.

Each stage's command lives in its own package (`bnpipe.train.cli`, `bnpipe.export.cli`,
`bnpipe.serve.cli`) and is imported only when it runs, so `bnpipe predict` never pays for
importing torch.
"""

from __future__ import annotations

import importlib
import sys

import click

from bnpipe import __version__
from bnpipe.errors import BnpipeError

# command name -> "module:attribute" of its click command
COMMANDS: dict[str, str] = {
    "train": "bnpipe.train.cli:train",
    "export": "bnpipe.export.cli:export",
    "fold": "bnpipe.export.fold_cli:fold",
    "predict": "bnpipe.serve.cli:predict",
    "samples": "bnpipe.serve.samples:samples",
    "serve": "bnpipe.serve.server_cli:serve",
}


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

    def invoke(self, ctx: click.Context) -> object:
        """Run the command; turn a ``BnpipeError`` into one line on stderr and its exit code."""
        # Library code raises BnpipeError for bad input; the user gets one line, never a traceback.
        try:
            return super().invoke(ctx)
        except BnpipeError as exc:
            click.echo(f"bnpipe: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, "-V", "--version", prog_name="bnpipe")
def cli() -> None:
    """Train a BatchNorm conv net on MNIST, fold BN into ONNX exactly, and predict with onnxruntime."""


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="bnpipe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
