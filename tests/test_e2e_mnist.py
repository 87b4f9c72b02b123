"""End to end on the real MNIST from $BNPIPE_DATA: one quick epoch must learn the digits."""

from pathlib import Path

from click.testing import CliRunner

from bnpipe.cli import cli
from bnpipe.train.checkpoint import load_checkpoint
from tests.conftest import real_mnist_root

MIN_TEST_ACC = 0.95  # 1 epoch on 10,000 training images with the default recipe gives ~0.97


def test_one_epoch_on_real_mnist_subset(tmp_path: Path) -> None:
    out = tmp_path / "real.pt"
    result = CliRunner().invoke(cli, ["train", "--data", str(real_mnist_root()), "--epochs", "1",
                                      "--limit-train", "10000", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = load_checkpoint(out)["metrics"]
    assert metrics[-1]["test_acc"] >= MIN_TEST_ACC, metrics
