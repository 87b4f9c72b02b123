"""Training curves as a PNG."""

from __future__ import annotations

import os

from bnpipe.atomic import atomic_path


def plot_curves(metrics: list[dict[str, float]], path: str | os.PathLike[str]) -> None:
    """Plot loss and accuracy per epoch, train and test, side by side; write the PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "test"):
        ax_loss.plot(epochs, [m[f"{split}_loss"] for m in metrics], marker="o", label=split)
        ax_acc.plot(epochs, [m[f"{split}_acc"] for m in metrics], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
