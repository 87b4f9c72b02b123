"""Atomic file writes: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bnpipe.errors import BnpipeError, one_line


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary file lives in the same directory, so the final ``os.replace`` is atomic on
    POSIX: readers see either the old file or the complete new one, never a half-written one.
    If the body raises, the temporary file is removed and ``path`` is left as it was; an OSError
    (a read-only or full disk, a missing permission) becomes a one-line ``BnpipeError``.

    Args:
        path: The final destination. Its parent directory is created if needed, and removed again
            (with the parents it made) if the body raises.

    Yields:
        A fresh path that the caller writes the complete content to.
    """
    final = Path(path)
    with made_dirs(final.parent, final):
        try:
            # Keep the real suffix last so that writers which dispatch on it (matplotlib) still work.
            fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
        except OSError as exc:
            raise _cannot_write(final, exc) from None
        os.close(fd)
        with _replacing(Path(tmp), final) as tmp_path:
            yield tmp_path


@contextlib.contextmanager
def _replacing(tmp_path: Path, final: Path) -> Iterator[Path]:
    """Yield ``tmp_path``; then sync it and rename it onto ``final``, or remove it if anything fails."""
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())  # the data reaches the disk before the rename makes it visible
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, final)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _cannot_write(final, exc) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _cannot_write(final: Path, exc: OSError) -> BnpipeError:
    """The one line for an OSError met writing ``final``, naming a folder on its way that is a file."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        for folder in reversed([final, *final.parents]):
            if folder.exists() and not folder.is_dir():
                return BnpipeError(f"{final}: cannot write: {folder} is a file, not a folder")
    return BnpipeError(f"{final}: cannot write ({exc.strerror or one_line(exc)})")


@contextlib.contextmanager
def made_dirs(folder: str | os.PathLike[str], target: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Create ``folder`` and its missing parents; remove those it created if the body raises.

    Args:
        folder: The folder to make.
        target: The file it is made for, which an error names (``folder`` itself by default).
    """
    missing = [f for f in [Path(folder), *Path(folder).parents] if not f.exists()]
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(Path(target if target is not None else folder), exc) from None
    try:
        yield
    except BaseException:
        for f in missing:  # deepest first; a folder something else filled meanwhile stays
            with contextlib.suppress(OSError):
                f.rmdir()
        raise


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail early, before any long work, when ``path`` could not be written atomically later.

    Folders made for the trial are removed again (`atomic_path`): a command that fails later leaves none.

    Raises:
        BnpipeError: The name is empty or names a folder, or its folder cannot be made or written.
    """
    if not str(path):
        raise BnpipeError("the output path is empty")
    final = Path(path)
    if not final.name or final.is_dir():
        raise BnpipeError(f"{str(path)!r}: not a file name")
    try:
        with atomic_path(final):
            raise _Probe  # leave the target untouched: the temporary file is made, then removed
    except _Probe:
        pass


class _Probe(Exception):
    """Aborts the trial write of `check_writable`."""


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))
