"""Precise BN: running statistics recomputed as population statistics under the final weights.

The moving averages that training leaves in each BN layer mix statistics of weights that kept
changing. Precise BN (fvcore's ``update_bn_stats``; Wu & Johnson, "Rethinking Batch in
BatchNorm", 2021) runs training batches through the frozen model in train mode and replaces them
with the mean and variance of each BN's input over all those batches.

We accumulate, per channel, the count, sum and sum of squares of each BN's input in float64, and
write the exact population mean and unbiased variance over the batches seen. (fvcore averages
the per-batch variances instead, which misses the spread of the batch means.) With equal-size
batches the mean is the equal-weight average of the batch means.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
import torch.distributed as dist
from torch import nn

from bnpipe.train.batchnorm import ScratchBatchNorm2d, moment_sums, moments_from_sums
from bnpipe.train.distributed import World, local_batches

BN_TYPES = (nn.modules.batchnorm._BatchNorm, ScratchBatchNorm2d)


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """The BN layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, BN_TYPES) and getattr(m, "running_mean", None) is not None]


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], reduce_ranks: bool = False) -> int:
    """Replace each BN's running mean and variance by the population statistics of its input.

    The model runs in train mode (each BN normalizes with its batch's statistics, as in training),
    with no gradients and its weights untouched; its mode and each ``num_batches_tracked`` are
    restored afterwards.

    Args:
        model: The net; its BN layers may be ``nn.BatchNorm*``, ``nn.SyncBatchNorm`` or ours.
        batches: Normalized network inputs [N, C, H, W], one tensor per batch.
        reduce_ranks: Sum the statistics over the ranks of the process group (DDP).

    Returns:
        The number of batches this process ran.
    """
    layers = bn_layers(model)
    # Per layer: [count, sum per channel (C), sum of squares per channel (C)] of its input, float64.
    sums = [torch.zeros(1 + 2 * m.running_mean.numel(), dtype=torch.float64, device=m.running_mean.device)
            for m in layers]

    def record(index: int):  # noqa: ANN202 - a forward pre-hook
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            sums[index] += moment_sums(inputs[0].double())
        return hook

    handles = [m.register_forward_pre_hook(record(i)) for i, m in enumerate(layers)]
    tracked = [m.num_batches_tracked.clone() for m in layers]
    was_training = model.training
    model.train()
    count = 0
    try:
        for x in batches:
            model(x)
            count += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if reduce_ranks and dist.is_available() and dist.is_initialized() and sums:
        flat = torch.cat(sums)  # every layer's sums in one all-reduce
        dist.all_reduce(flat)
        sums = list(flat.split([s.numel() for s in sums]))
    for m, s, t in zip(layers, sums, tracked):
        m.num_batches_tracked.copy_(t)
        mean, var, n = moments_from_sums(s)
        if n < 2:
            continue  # nothing seen: keep the moving statistics
        var = var * (n / (n - 1))  # unbiased, as BN's running_var
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return count


def recompute_bn_stats(net: nn.Module, inputs: torch.Tensor, batch_size: int, count: int, order: torch.Tensor,
                       world: World) -> int:
    """Precise BN over the first ``count`` global batches of ``order``; each rank runs its slice.

    Args:
        net: The bare model (not the DDP wrapper).
        inputs: Normalized training images [N, C, H, W], as in training.
        batch_size: The global batch, split over the ranks as in training.
        count: Global batches to run (at most one pass over ``order``).
        order: The sample order to take them from.
        world: This process's place; statistics are summed over the ranks.

    Returns:
        The number of batches run.
    """
    local = islice(local_batches(order.to(inputs.device), batch_size, world), count)
    return update_bn_stats(net, (inputs.index_select(0, idx) for idx, _ in local), reduce_ranks=world.distributed)
