"""MNIST's IDX files and the sample PNGs (bnpipe.serve.samples): a round trip, and every bad header."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bnpipe.errors import BnpipeError
from bnpipe.serve.samples import read_idx, sample_name, write_samples
from tests.mnist_files import synthetic_digits, write_mnist_raw


def test_round_trip_through_the_sample_pngs(tmp_path: Path) -> None:
    root = write_mnist_raw(tmp_path / "data", n_train=10, n_test=12, seed=3)
    raw = root / "MNIST" / "raw"
    images, labels = synthetic_digits(12, seed=4)  # what write_mnist_raw wrote for t10k (seed + 1)
    assert np.array_equal(read_idx(raw / "t10k-images-idx3-ubyte"), images)
    assert np.array_equal(read_idx(raw / "t10k-labels-idx1-ubyte"), labels)
    paths = write_samples(root, tmp_path / "png", count=5)
    assert [p.name for p in paths] == [sample_name(i, int(labels[i])) for i in range(5)]
    for i, path in enumerate(paths):
        assert np.array_equal(np.asarray(Image.open(path)), images[i])


@pytest.mark.parametrize("data,match", [
    (b"\0\0\x08\x03\0\0", "truncated IDX header \\(6 bytes; 3 dimensions need 16\\)"),
    (b"\0\0\x08\x01", "truncated IDX header"),
    (b"\0\0\x0d\x01\0\0\0\x01\0\0\0\0", "not an unsigned-byte IDX file"),  # float32 type code
    (b"\x01\0\x08\x01\0\0\0\x01\x07", "not an unsigned-byte IDX file"),
    (b"\0\0", "not an unsigned-byte IDX file"),
    (b"\0\0\x08\x01\0\0\0\x03\x07", "IDX header says \\(3,\\) but holds 1 bytes"),
])
def test_bad_idx_files_are_one_line_errors(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(BnpipeError, match=f"^{re.escape(str(path))}: {match}") as info:
        read_idx(path)
    assert "\n" not in str(info.value)


def test_missing_idx_file(tmp_path: Path) -> None:
    with pytest.raises(BnpipeError, match="nope: cannot read"):
        read_idx(tmp_path / "nope")


def test_images_and_labels_of_different_lengths_are_refused(tmp_path: Path) -> None:
    from tests.mnist_files import write_idx

    root = write_mnist_raw(tmp_path, n_train=10, n_test=10)
    write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(BnpipeError, match=r"do not match: images \(10, 28, 28\), labels \(4,\)"):
        write_samples(root, tmp_path / "out")
