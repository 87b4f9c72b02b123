"""The command line's PATHs as inputs: image files, directories taken recursively, and stdin."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

STDIN = "-"


@dataclass
class Item:
    """One input: ``name`` as the user will see it, ``source`` a path or the bytes read from stdin."""

    name: str
    source: str | bytes
    error: str | None = None  # set when the input is known bad before decoding (a missing path)


def _not_regular(path: str) -> str | None:
    """Why ``path`` (links followed) is no file to decode, or None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:  # a broken link, or a race with a deletion
        return f"cannot read ({exc.strerror})"
    # A FIFO or a device would block or never end: report it in its place instead.
    return None if stat.S_ISREG(mode) else "not a regular file"


def walk_images(directory: str) -> list[Item]:
    """Return an item for each entry under ``directory``, recursively, sorted by path components.

    Hidden entries (``.DS_Store``, editor swap files) are skipped; everything else appears: a
    file that is not an image fails at decoding, and a FIFO, a device, a broken link or an
    unreadable folder is an item with ``error`` set. Linked folders are followed, once each.
    Each folder is listed once (`os.scandir`) and its entries sorted by name; a regular file
    costs no `stat` call, since the listing already says what each entry is.
    """
    found: list[Item] = []
    seen: set[str] = set()
    todo: list[Item | str] = [directory]  # a stack: folders to list (str) and items found, the next on top
    while todo:
        entry = todo.pop()
        if isinstance(entry, Item):
            found.append(entry)
            continue
        real = os.path.realpath(entry)
        if real in seen:  # a link back into the tree: walking it again would never end
            found.append(Item(entry, entry, error="folder already walked through another link"))
            continue
        seen.add(real)
        try:
            with os.scandir(entry) as listing:
                names = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as exc:
            found.append(Item(entry, entry, error=f"cannot read folder ({exc.strerror})"))
            continue
        todo.extend(_kind(e) for e in reversed(names))
    return found


def _kind(entry: os.DirEntry[str]) -> Item | str:
    """A listed entry as an item (a file, or something that is no file) or a folder to walk (its path)."""
    try:
        if entry.is_file():  # links followed; the listing says what a plain entry is, with no stat call
            return Item(entry.path, entry.path)
        if entry.is_dir():
            return entry.path
    except OSError:
        pass
    return Item(entry.path, entry.path, error=_not_regular(entry.path))


def expand_inputs(paths: Sequence[str], stdin: bytes | None = None) -> list[Item]:
    """Turn the command line's PATHs into items: files, directory contents, stdin.

    Args:
        paths: Each an image file, a directory, or ``-``.
        stdin: The bytes of standard input, when ``-`` is among ``paths``.

    Returns:
        One item per image, in order; a missing path or an empty directory is an item with
        ``error`` set, so that it is reported in its place.
    """
    items: list[Item] = []
    for path in paths:
        if path == STDIN:
            items.append(Item(STDIN, stdin if stdin is not None else b""))
        elif os.path.isdir(path):
            found = walk_images(path)
            items.extend(found)
            if not found:
                items.append(Item(path, path, error="directory holds no files"))
        elif not os.path.exists(path):
            items.append(Item(path, path, error="no such file or directory"))
        else:
            items.append(Item(path, path))
    return items
