"""Shared fixtures: tiny MNIST files, a quickly trained checkpoint, and its ONNX exports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.mnist_files import write_mnist_raw

REPO = Path(__file__).resolve().parents[1]


def real_mnist_root() -> Path:
    """The real MNIST root from $BNPIPE_DATA; tests that need it fail loudly when it is absent."""
    root = os.environ.get("BNPIPE_DATA")
    assert root, "set BNPIPE_DATA to the MNIST root (e.g. ../shared/data), as the README's test command does"
    path = Path(root).resolve()
    assert (path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file(), f"no MNIST raw files under {path}"
    return path


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root holding tiny synthetic MNIST/raw files (320 train, 100 test images)."""
    return write_mnist_raw(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint from a quick real training run (2 epochs on the tiny data)."""
    from bnpipe.train.config import TrainConfig
    from bnpipe.train.loop import train

    out = tmp_path_factory.mktemp("ckpt") / "bn_convnet.pt"
    train(TrainConfig(data=str(tiny_mnist), epochs=2, batch_size=32, out=str(out)), log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def exported_models(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained checkpoint exported twice: with BN folded, and with BN kept."""
    from bnpipe.export.pipeline import export_checkpoint

    out = tmp_path_factory.mktemp("onnx")
    paths = {"checkpoint": trained_checkpoint, "onnx_folded": out / "folded.onnx", "onnx_unfolded": out / "unfolded.onnx"}
    export_checkpoint(trained_checkpoint, paths["onnx_folded"], fold_bn=True)
    export_checkpoint(trained_checkpoint, paths["onnx_unfolded"], fold_bn=False)
    return paths
