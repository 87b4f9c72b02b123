"""`bnpipe train`: a thin click command over :func:`bnpipe.train.loop.train`."""

from __future__ import annotations

import click

from bnpipe.train.config import BN_CHOICES, DEVICES, NORMALIZE_MODES, SCHEDULES, TrainConfig

D = TrainConfig()  # the defaults live in one place


@click.command()
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="MNIST root (holding MNIST/raw). Default: $BNPIPE_DATA, else ./data.")
@click.option("--epochs", type=click.IntRange(min=1), default=D.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=D.batch_size, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=D.lr, show_default=True,
              help="Peak learning rate of SGD.")
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=D.momentum, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=D.weight_decay, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default=D.schedule, show_default=True,
              help="Learning-rate schedule over all steps (onecycle: warm up for 20%, then anneal).")
@click.option("--bn", type=click.Choice(BN_CHOICES), default=D.bn, show_default=True,
              help="Normalization layer: nn.BatchNorm2d, our from-scratch BN, or none (baseline).")
@click.option("--normalize", type=click.Choice(NORMALIZE_MODES), default=D.normalize, show_default=True,
              help="Input normalization: half is (x/255-0.5)/0.5; dataset uses the training set's mean and std.")
@click.option("--seed", type=int, default=D.seed, show_default=True, help="Same seed, same machine: same weights.")
@click.option("--device", type=click.Choice(DEVICES), default=D.device, show_default=True)
@click.option("--limit-train", type=click.IntRange(min=1), default=None,
              help="Train on the first N training images only (quick runs).")
@click.option("--out", type=click.Path(dir_okay=False), default=D.out, show_default=True,
              help="Checkpoint path; the .json sidecar and .png plot go beside it.")
def train(**options: object) -> None:
    """Train the BN conv net on MNIST and write a checkpoint.

    The defaults are the best 5-epoch recipe found (SGD, momentum 0.9, one-cycle schedule). The
    tutorial's own settings are: --lr 0.1 --momentum 0 --weight-decay 0 --schedule none.
    """
    from bnpipe.train.loop import sidecar_paths
    from bnpipe.train.loop import train as run_training

    config = TrainConfig(**options)  # type: ignore[arg-type]
    metrics = run_training(config, log=click.echo)
    json_path, png_path = sidecar_paths(config.out)
    click.echo(f"final test accuracy {metrics[-1]['test_acc']:.4f}; wrote {config.out}, {json_path}, {png_path}")
