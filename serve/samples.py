"""`bnpipe samples`: write MNIST test images as PNG files, to try `bnpipe predict` on (no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np

from bnpipe.atomic import atomic_path
from bnpipe.datadir import resolve_data_root
from bnpipe.errors import BnpipeError

_DTYPE_CODE = 0x08  # IDX type code for unsigned bytes, the only one MNIST uses


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file of unsigned bytes (MNIST's format) into a uint8 array.

    Raises:
        BnpipeError: The file is missing, not an unsigned-byte IDX file, or truncated.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BnpipeError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _DTYPE_CODE:
        raise BnpipeError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise BnpipeError(f"{path}: truncated IDX header ({len(data)} bytes; {ndim} dimensions need {4 + 4 * ndim})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise BnpipeError(f"{path}: IDX header says {shape} but holds {payload.size} bytes")
    return payload.reshape(shape)


def sample_name(index: int, label: int) -> str:
    """``00042_7.png``: sorted by index, with the true label after the underscore."""
    return f"{index:05d}_{label}.png"


def write_samples(root: str | os.PathLike[str], out_dir: str | os.PathLike[str], count: int | None = None) -> list[Path]:
    """Write the first ``count`` MNIST test images (all if None) as grayscale PNGs.

    Args:
        root: MNIST root holding ``MNIST/raw/t10k-{images-idx3,labels-idx1}-ubyte``.
        out_dir: Directory for the PNGs, created if needed.
        count: How many images, from the start of the test set.

    Returns:
        The written paths, in test-set order.
    """
    from PIL import Image

    raw = Path(root) / "MNIST" / "raw"
    images, labels = read_idx(raw / "t10k-images-idx3-ubyte"), read_idx(raw / "t10k-labels-idx1-ubyte")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise BnpipeError(f"MNIST test files in {raw} do not match: images {images.shape}, labels {labels.shape}")
    n = len(images) if count is None else min(count, len(images))
    paths = []
    for i in range(n):
        path = Path(out_dir) / sample_name(i, int(labels[i]))
        with atomic_path(path) as tmp:
            Image.fromarray(images[i], mode="L").save(tmp, format="PNG")
        paths.append(path)
    return paths


@click.command()
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="MNIST root (holding MNIST/raw). Default: $BNPIPE_DATA, else ./data.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="models/samples", show_default=True,
              help="Directory to write the PNG files to.")
@click.option("-n", "--count", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many test images, from the start of the test set.")
def samples(data: str | None, out_dir: str, count: int) -> None:
    """Write MNIST test images as PNGs named INDEX_LABEL.png, to try `bnpipe predict` on."""
    paths = write_samples(resolve_data_root(data), out_dir, count)
    click.echo(f"wrote {len(paths)} PNG files to {out_dir}")
