"""The one exception type that the CLI turns into a single clear line and a non-zero exit."""

from __future__ import annotations

import os
from typing import IO, Any


class BnpipeError(Exception):
    """A user-facing failure: bad input, a missing file, a refused operation.

    The message must name the thing at fault and say what is wrong with it, on one line.
    The CLI prints ``bnpipe: error: <message>`` to stderr and exits with ``exit_code``.
    """

    exit_code = 1


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message squeezed onto one line (libraries raise multi-line ones), or its type."""
    text = " ".join(str(exc).split())
    return text[:limit] if text else type(exc).__name__


def discard_stream(stream: IO[Any]) -> None:
    """Point ``stream``'s file descriptor at /dev/null, so that Python's flush at exit cannot fail again."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation (an in-memory stream) is both
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def output_error(stream: IO[Any], exc: OSError) -> BnpipeError:
    """The error for a ``stream`` that cannot be written (a full disk, /dev/full); the stream is discarded."""
    discard_stream(stream)
    return BnpipeError(f"cannot write output: {exc.strerror or exc}")
