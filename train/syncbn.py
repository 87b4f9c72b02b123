"""BatchNorm with batch statistics over all ranks: ``--bn sync``.

On CUDA this is ``nn.SyncBatchNorm``. It refuses CPU tensors, so on the CPU our from-scratch BN
reduces each channel's count, sum and sum of squares over the ranks with the differentiable
``torch.distributed.nn.functional.all_reduce``: its backward all-reduces the gradients of the
sums, so each rank's inputs get the gradient of the loss summed over every rank, as with
``nn.SyncBatchNorm``. In one process both are the plain BN.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch import nn

from bnpipe.train.batchnorm import BatchStats, ScratchBatchNorm2d, moment_sums, moments_from_sums

# torch 2.14 deprecates this module for _functional_collectives, whose all_reduce has no backward.
DEPRECATED = r"torch\.distributed\.nn\.functional\.all_reduce is deprecated"


def sync_batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and biased variance per channel of ``x`` [N, C, H, W] over every rank's batch.

    Returns:
        mean [C], biased variance [C], and the number of values per channel over all ranks.
    """
    with warnings.catch_warnings():  # silenced here only, not for the whole process
        warnings.filterwarnings("ignore", message=DEPRECATED, category=FutureWarning)
        stats = dist_autograd.all_reduce(moment_sums(x))  # one collective for count, sums and squares
    mean, var, n = moments_from_sums(stats)
    return mean, var, int(n.item())


class SyncScratchBatchNorm2d(ScratchBatchNorm2d):
    """``ScratchBatchNorm2d`` whose training statistics span every rank of the process group.

    Same parameters, buffers and state_dict keys, so its checkpoints load as ``--bn scratch`` (and
    ``torch``) ones. In eval mode, or without a process group of more than one rank, it is the plain
    layer.
    """

    def batch_stats(self) -> BatchStats | None:
        """The statistics of the global batch when several ranks train together."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return sync_batch_stats
        return None


def to_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Swap the model's BN layers for synchronized ones: ``nn.SyncBatchNorm`` on CUDA, ours on the CPU.

    The model must have been built with ``nn.BatchNorm2d`` for CUDA and ``ScratchBatchNorm2d`` for the CPU
    (see :func:`arch_bn_for`); weights and statistics carry over.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is ScratchBatchNorm2d:
            module.__class__ = SyncScratchBatchNorm2d  # same fields, new forward
    return model


def arch_bn_for(bn: str, device: torch.device) -> str:
    """The BN kind the checkpoint records for ``--bn`` on ``device``: a synced layer is a plain one in eval."""
    if bn != "sync":
        return bn
    return "torch" if device.type == "cuda" else "scratch"
