"""The one exception type that the CLI turns into a single clear line and a non-zero exit."""


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
