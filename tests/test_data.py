from pathlib import Path

import pytest
import torch

from bnpipe.errors import BnpipeError
from bnpipe.datadir import resolve_data_root
from bnpipe.train.data import load_mnist
from tests.mnist_files import synthetic_digits


def test_loads_whole_split_through_torchvision(tiny_mnist: Path) -> None:
    images, labels = load_mnist(tiny_mnist, train=True)
    expected_images, expected_labels = synthetic_digits(320, 0)
    assert images.shape == (320, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.equal(images[:, 0], torch.from_numpy(expected_images))
    assert torch.equal(labels, torch.from_numpy(expected_labels).long())
    assert load_mnist(tiny_mnist, train=False)[0].shape == (100, 1, 28, 28)


def test_root_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNPIPE_DATA", "/from/env")
    assert resolve_data_root("/given") == Path("/given")
    assert resolve_data_root(None) == Path("/from/env")
    monkeypatch.delenv("BNPIPE_DATA")
    assert resolve_data_root(None) == Path("data")


def test_missing_data_says_where_the_files_go(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(BnpipeError, match=r"nowhere/MNIST/raw.*train-images-idx3-ubyte") as err:
        load_mnist(root, train=True)
    assert "\n" not in str(err.value)
    assert not root.exists(), "a failed download must not leave empty folders behind"


def test_corrupt_file_is_named(tiny_mnist: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_mnist, root)
    images = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # truncated
    with pytest.raises(BnpipeError, match=f"^{images}: IDX header says .* but holds 984 bytes$"):
        load_mnist(root, train=False)


def test_a_label_out_of_range_is_named(tiny_mnist: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_mnist, root)
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[8] = 200  # the first label, after the 8-byte header
    labels.write_bytes(bytes(data))
    with pytest.raises(BnpipeError, match=f"^{labels}: holds label 200; MNIST labels are 0 to 9$"):
        load_mnist(root, train=True)


def test_raw_files_in_the_root_itself_get_a_hint(tiny_mnist: Path, tmp_path: Path) -> None:
    import shutil

    flat = tmp_path / "flat"
    shutil.copytree(tiny_mnist / "MNIST" / "raw", flat)
    with pytest.raises(BnpipeError, match=f"they are in {flat} itself: move them into {flat}/MNIST/raw$"):
        load_mnist(flat, train=True, download=False)
