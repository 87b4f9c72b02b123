"""MNIST through ``torchvision.datasets.MNIST``, loaded once into whole uint8 tensors."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import torch

from bnpipe.errors import BnpipeError, one_line

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASSES = tuple(str(d) for d in range(10))


def load_mnist(root: str | os.PathLike[str], train: bool, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one MNIST split as whole tensors, downloading the raw files if they are missing.

    Args:
        root: Directory holding ``MNIST/raw`` in torchvision's layout.
        train: The 60,000-image training split if True, else the 10,000-image test split.
        download: Try to download missing files (fails cleanly when offline).

    Returns:
        images uint8 [N, 1, 28, 28] and labels int64 [N].

    Raises:
        BnpipeError: The files are missing and cannot be downloaded, or a file is corrupt.
    """
    from torchvision.datasets import MNIST  # deferred: torchvision costs ~1 s to import

    root = Path(root)
    raw = root / "MNIST" / "raw"
    created = [p for p in (root, root / "MNIST", raw) if not p.exists()]
    try:
        # torchvision reports download attempts on stdout; keep it for the error message instead.
        with contextlib.redirect_stdout(io.StringIO()):
            ds = MNIST(str(root), train=train, download=download)
    except Exception as exc:  # noqa: BLE001 - torchvision raises bare RuntimeError/AssertionError/ValueError
        missing = [f for f in RAW_FILES if not (raw / f).is_file()]
        if missing:
            for p in reversed(created):  # leave no empty folders behind from a failed download
                shutil.rmtree(p, ignore_errors=True)
            flat = all((root / f).is_file() for f in missing)
            raise BnpipeError(
                f"MNIST not found in {raw} ({', '.join(missing)} missing) and could not be downloaded; "
                + (f"they are in {root} itself: move them into {raw}" if flat else
                   "put the raw files there, or point --data/BNPIPE_DATA at the folder that holds MNIST/raw")
            ) from None
        raise _corrupt(raw, train, exc) from None
    images, labels = ds.data, ds.targets
    if images.dim() != 3 or images.dtype != torch.uint8 or labels.shape != images.shape[:1]:
        raise BnpipeError(
            f"MNIST files in {raw} are inconsistent: images {tuple(images.shape)} {images.dtype}, "
            f"labels {tuple(labels.shape)}"
        )
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(CLASSES):
        bad = int(labels.max()) if int(labels.max()) >= len(CLASSES) else int(labels.min())
        raise BnpipeError(f"{raw / _split_files(train)[1]}: holds label {bad}; "
                          f"MNIST labels are 0 to {len(CLASSES) - 1}")
    return images.unsqueeze(1).contiguous(), labels.to(torch.int64)


def _split_files(train: bool) -> tuple[str, str]:
    """The (images, labels) raw file names of a split."""
    return RAW_FILES[:2] if train else RAW_FILES[2:]


def _corrupt(raw: Path, train: bool, exc: Exception) -> BnpipeError:
    """Which raw file torchvision could not read, and why (its own exceptions say neither)."""
    from bnpipe.serve.samples import read_idx  # the IDX reader with one-line errors

    for name, ndim in zip(_split_files(train), (3, 1)):
        try:
            array = read_idx(raw / name)
        except BnpipeError as found:
            return found
        if array.ndim != ndim:
            return BnpipeError(f"{raw / name}: {array.ndim} dimensions; this MNIST file has {ndim}")
    return BnpipeError(f"MNIST files in {raw} are corrupt or unreadable: {one_line(exc)}")
