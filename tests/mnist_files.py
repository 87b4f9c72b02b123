"""Write tiny MNIST-format (IDX) files for tests: big-endian headers, uint8 payloads."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Easy, learnable 28x28 "digits": class k is a bright bar at a class-specific place, plus noise.

    Returns:
        images uint8 [n, 28, 28] (light on dark, like MNIST) and labels uint8 [n].
    """
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, k in enumerate(labels):
        row, col = 4 + 2 * (k % 5), 6 + 10 * (k // 5)
        images[i, row : row + 10, col : col + 6] = 255
    return images, labels


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in IDX format (magic 0x00000800 | ndim, then big-endian dims)."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist_raw(root: Path, n_train: int = 320, n_test: int = 100, seed: int = 0) -> Path:
    """Create ``root/MNIST/raw`` with the four files torchvision expects; return ``root``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = synthetic_digits(n, s)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root
