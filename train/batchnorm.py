"""Batch normalization from scratch, matching ``torch.nn.BatchNorm1d/2d`` exactly."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


BatchStats = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, int]]


def local_batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean [C], biased variance [C] and the number of values per channel of [N, C, *spatial] ``x``."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dim=dims), x.var(dim=dims, correction=0), x.numel() // x.shape[1]


def moment_sums(x: torch.Tensor) -> torch.Tensor:
    """[count, sum per channel (C), sum of squares per channel (C)] of [N, C, *spatial] ``x``: shape [1 + 2C].

    Sums add up across batches and ranks, so one all-reduce or a running total combines them.
    """
    dims = [0, *range(2, x.dim())]
    return torch.cat([x.new_tensor([x.numel() // x.shape[1]]), x.sum(dims), (x * x).sum(dims)])


def moments_from_sums(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean [C], biased variance [C] and count (a 0-d tensor) from :func:`moment_sums` totals."""
    c = (sums.shape[0] - 1) // 2
    n = sums[0].detach()  # a count: nothing to differentiate
    mean = sums[1 : 1 + c] / n
    return mean, (sums[1 + c :] / n - mean * mean).clamp_min(0), n  # E[x^2] - E[x]^2


@torch.no_grad()
def update_moving_stats(moving_mean: torch.Tensor | np.ndarray, moving_var: torch.Tensor | np.ndarray,
                        mean: torch.Tensor | np.ndarray, var: torch.Tensor | np.ndarray, n: int | float,
                        momentum: float) -> None:
    """PyTorch's update of the moving statistics [C] in place, from a batch's mean and biased variance [C].

    The moving variance takes the unbiased batch variance. See :func:`batch_norm` for the tutorial's
    reversed form. Tensors, or numpy arrays: `bnpipe.train.conv_bn` passes numpy views of a BN's
    buffers and its float64 statistics, as a few numpy ops on 6 numbers cost less than torch's.

    Args:
        moving_mean: Running mean [C], updated in place.
        moving_var: Running variance [C], updated in place.
        mean: The batch's mean [C], without a graph.
        var: The batch's biased variance [C], without a graph.
        n: Values per channel in the batch (the variance is made unbiased with n / (n - 1)).
        momentum: The weight of the new batch.
    """
    moving_mean *= 1 - momentum
    moving_mean += momentum * mean
    moving_var *= 1 - momentum
    moving_var += momentum * n / (n - 1) * var


def batch_momentum(momentum: float | None, num_batches_tracked: torch.Tensor) -> float:
    """The weight of this batch in the moving statistics, as ``nn.BatchNorm2d`` takes it.

    Args:
        momentum: The layer's momentum; None means a cumulative average.
        num_batches_tracked: The batches counted so far, this one included.

    Returns:
        ``momentum``, or 1 / ``num_batches_tracked`` for None.
    """
    return momentum if momentum is not None else 1.0 / float(num_batches_tracked)


def batch_norm(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    moving_mean: torch.Tensor,
    moving_var: torch.Tensor,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    batch_stats: BatchStats | None = None,
) -> torch.Tensor:
    """Batch normalization of [N, C] or [N, C, *spatial] inputs, one statistic per channel C.

    In training it normalizes with the batch's mean and biased variance, and updates the moving
    statistics in place. In eval it normalizes with the moving statistics.

    The update follows PyTorch's convention, where ``momentum`` is the weight of the NEW batch::

        moving_mean = (1 - momentum) * moving_mean + momentum * batch_mean
        moving_var  = (1 - momentum) * moving_var  + momentum * batch_var_unbiased

    The tutorial this project grew from used the reverse (``momentum * moving + (1 - momentum) *
    batch`` with momentum 0.9): the same numbers only when its momentum is 1 - ours. It also
    updated the moving variance with the biased batch variance; PyTorch uses the unbiased one
    (divided by n - 1, with n = N * prod(spatial)) for the moving variance, while normalizing the
    batch itself with the biased one.

    Args:
        x: Input, [N, C] or [N, C, H, W] (any number of spatial axes).
        gamma: Scale per channel [C], or None for no affine scale.
        beta: Shift per channel [C], or None for no affine shift.
        moving_mean: Running mean [C], updated in place when training.
        moving_var: Running variance [C], updated in place when training.
        training: Normalize with batch statistics and update the moving ones.
        momentum: Weight of the new batch in the moving statistics.
        eps: Added to the variance for numerical stability.
        batch_stats: Computes the batch's mean, biased variance and values per channel in training;
            :func:`local_batch_stats` by default (``bnpipe.train.syncbn`` passes one over all ranks).

    Returns:
        The normalized tensor, same shape as ``x``.
    """
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects [N, C, ...] input, got shape {tuple(x.shape)}")
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)  # broadcast a [C] statistic against x
    if training:
        mean, var, n = (batch_stats or local_batch_stats)(x)
        if n <= 1:
            raise ValueError(f"batch_norm needs more than 1 value per channel when training, got shape {tuple(x.shape)}")
        update_moving_stats(moving_mean, moving_var, mean.detach().to(moving_mean.dtype),
                            var.detach().to(moving_var.dtype), n, momentum)
    else:
        mean, var = moving_mean, moving_var
    y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    if gamma is not None:
        y = y * gamma.reshape(shape)
    if beta is not None:
        y = y + beta.reshape(shape)
    return y


class ScratchBatchNorm2d(nn.Module):
    """``nn.BatchNorm2d`` built on :func:`batch_norm`, with the same state_dict keys and shapes.

    Keys: ``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``, so a
    checkpoint made with either class loads into the other.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize [N, C, H, W]; in training also count the batch and update the moving statistics."""
        if x.dim() != 4:
            raise ValueError(f"ScratchBatchNorm2d expects [N, C, H, W] input, got shape {tuple(x.shape)}")
        momentum = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            momentum = batch_momentum(self.momentum, self.num_batches_tracked)
        return batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                          self.training, momentum, self.eps, self.batch_stats())

    def batch_stats(self) -> BatchStats | None:
        """How training computes the batch statistics: None for this batch alone."""
        return None

    def extra_repr(self) -> str:
        """The constructor arguments, as ``nn.BatchNorm2d`` prints them."""
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
