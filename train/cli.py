"""`bnpipe train`: a thin click command over :func:`bnpipe.train.loop.train`."""

from __future__ import annotations

import click
from click.core import ParameterSource

from bnpipe.params import FiniteRange
from bnpipe.train.config import DEVICES, NORMALIZE_MODES, SCHEDULES, TRAIN_BN_CHOICES, TrainConfig

D = TrainConfig()  # the defaults live in one place


@click.command()
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="MNIST root (holding MNIST/raw). Default: $BNPIPE_DATA, else ./data.")
@click.option("--epochs", type=click.IntRange(min=1), default=D.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=D.batch_size, show_default=True,
              help="The global batch: with several processes each takes its share.")
@click.option("--lr", type=FiniteRange(min=0, min_open=True), default=D.lr, show_default=True,
              help="Peak learning rate of SGD.")
@click.option("--momentum", type=FiniteRange(0, 1, max_open=True), default=D.momentum, show_default=True)
@click.option("--weight-decay", type=FiniteRange(min=0), default=D.weight_decay, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default=D.schedule, show_default=True,
              help="Learning-rate schedule over all steps (onecycle: warm up for 20%, then anneal).")
@click.option("--bn", type=click.Choice(TRAIN_BN_CHOICES), default=D.bn, show_default=True,
              help="Normalization layer: nn.BatchNorm2d, our from-scratch BN, none (baseline), or sync: "
                   "batch statistics over all processes (nn.SyncBatchNorm on CUDA, ours on the CPU).")
@click.option("--normalize", type=click.Choice(NORMALIZE_MODES), default=D.normalize, show_default=True,
              help="Input normalization: half is (x/255-0.5)/0.5; dataset uses the training set's mean and std.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=D.seed, show_default=True,
              help="Same seed, same machine: same weights.")
@click.option("--device", type=click.Choice(DEVICES), default=D.device, show_default=True)
@click.option("--limit-train", type=click.IntRange(min=1), default=None,
              help="Train on the first N training images only (quick runs).")
@click.option("--precise-bn", type=click.IntRange(min=0), default=D.precise_bn, show_default=True,
              help="After the last epoch, recompute the BN statistics over N training batches (0: off).")
@click.option("--out", type=click.Path(dir_okay=False), default=D.out, show_default=True,
              help="Checkpoint path; the .json sidecar and .png plot go beside it.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None,
              help="Continue the run that wrote this checkpoint, with its own settings (writes to it unless --out).")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
              help="Train in N processes through torch.distributed.run (DDP; 1 thread each when N > 1).")
@click.option("--dist-timeout", type=FiniteRange(min=0, min_open=True), default=D.dist_timeout,
              show_default=True, help="Seconds to wait for the other processes when joining and at each collective.")
@click.pass_context
def train(ctx: click.Context, resume: str | None, nproc_per_node: int | None, **options: object) -> None:
    """Train the BN conv net on MNIST and write a checkpoint.

    The defaults are the best 5-epoch recipe found (SGD, momentum 0.9, one-cycle schedule). The
    tutorial's own settings are: --lr 0.1 --momentum 0 --weight-decay 0 --schedule none.
    Under torchrun (torchrun --nproc-per-node N -m bnpipe train ...) it trains with DDP.
    """
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    if nproc_per_node is not None:
        from bnpipe.errors import BnpipeError
        from bnpipe.train.distributed import check_batch, launch, launched_by_torchrun

        if launched_by_torchrun():
            raise BnpipeError("--nproc-per-node: this process is already a torchrun worker; give the count to torchrun")
        if resume is None:  # before any worker starts (a resumed run's batch is the checkpoint's: workers check)
            check_batch(options["batch_size"], nproc_per_node)  # type: ignore[arg-type]

        if resume is not None:
            given["resume"] = resume
        launch(nproc_per_node, [a for k, v in given.items() for a in _as_args(k, v)])
        return

    from bnpipe.train.artifacts import sidecar_paths
    from bnpipe.train.distributed import env_world
    from bnpipe.train.loop import train as run_training

    if resume is not None:
        from bnpipe.train.checkpoint import load_checkpoint
        from bnpipe.train.resume import config_from_checkpoint

        config = config_from_checkpoint(load_checkpoint(resume), {"out": resume, **given})
    else:
        config = TrainConfig(**options)  # type: ignore[arg-type]
    metrics = run_training(config, log=click.echo, resume=resume)
    json_path, png_path = sidecar_paths(config.out)
    if env_world().is_main:  # under torchrun, rank 0 speaks for all
        click.echo(f"final test accuracy {metrics[-1]['test_acc']:.4f}; wrote {config.out}, {json_path}, {png_path}")


def _as_args(name: str, value: object) -> list[str]:
    """An option back as command-line words, for the worker processes."""
    return [f"--{name.replace('_', '-')}", str(value)]
