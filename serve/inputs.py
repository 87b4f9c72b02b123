"""The command line's PATHs as inputs: image files, directories taken recursively, and stdin."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

STDIN = "-"


@dataclass
class Item:
    """One input: ``name`` as the user will see it, ``source`` a path or the bytes read from stdin."""

    name: str
    source: str | bytes
    error: str | None = None  # set when the input is known bad before decoding (a missing path)


def walk_images(directory: str) -> list[str]:
    """Return the files under ``directory``, recursively, sorted by path components.

    Every file counts except hidden ones (``.DS_Store``, editor swap files): one that is not an
    image is reported as such rather than silently skipped.
    """
    found: list[str] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, f) for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.split(os.sep))


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
            files = walk_images(path)
            items.extend(Item(f, f) for f in files)
            if not files:
                items.append(Item(path, path, error="directory holds no files"))
        elif not os.path.exists(path):
            items.append(Item(path, path, error="no such file or directory"))
        else:
            items.append(Item(path, path))
    return items
