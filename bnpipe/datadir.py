"""Where the MNIST root is, for every stage (no torch here)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "BNPIPE_DATA"


def resolve_data_root(data: str | os.PathLike[str] | None) -> Path:
    """The MNIST root: ``data`` if given, otherwise ``$BNPIPE_DATA``, otherwise ``./data``."""
    return Path(data if data is not None else os.environ.get(ENV_VAR) or "data")


def mnist_test_images(root: str | os.PathLike[str]) -> Path:
    """The MNIST test-set image file under an MNIST root, in torchvision's layout."""
    return Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
