"""The im2col patches of a conv's input and their moments, from which `bnpipe.train.conv_bn` folds BN.

The moments are summed per image in float32 by one batched matmul and over the batch in float64,
and shifted in a second pass where the input sits far from zero (:func:`_shift`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def patches(x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int],
            shift: torch.Tensor | None = None, windows: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """The im2col of [N, C, H, W] ``x`` for a stride-1 conv with zero padding.

    Args:
        x: The input.
        kernel: (kh, kw).
        padding: (ph, pw), zeros on each side.
        shift: Subtracted per channel [C] from the padded input, zeros included (see :func:`_shift`).
        windows: Order the output positions by 2x2 window, for a max pool over the conv's output:
            (dy, dx, y // 2, x // 2) for output (y, x), so that the 4 values of each window lie in
            4 contiguous blocks (see `bnpipe.train.maxpool.pool_windows`). Ho and Wo must be even.

    Returns:
        The patches [N, C * kh * kw, Ho * Wo], rows channel-major as the conv weight flattens, and (Ho, Wo).
    """
    (kh, kw), (ph, pw) = kernel, padding
    xp = F.pad(x, (pw, pw, ph, ph))
    xp = xp - shift.view(1, -1, 1, 1) if shift is not None else xp.contiguous()
    n, c, h, w = xp.shape
    ho, wo = h - kh + 1, w - kw + 1
    sn, sc, sh, sw = xp.stride()
    # [N, C, kh, kw, Ho, Wo]: patch value (c, i, j) at output (y, x) is xp[n, c, y + i, x + j]
    size, stride = (n, c, kh, kw, ho, wo), (sn, sc, sh, sw, sh, sw)
    if windows:  # [N, C, kh, kw, 2, 2, Ho/2, Wo/2]: y = 2 * (y // 2) + dy, and x alike
        size, stride = (n, c, kh, kw, 2, 2, ho // 2, wo // 2), (sn, sc, sh, sw, sh, sw, 2 * sh, 2 * sw)
    return xp.as_strided(size, stride).reshape(n, c * kh * kw, ho * wo), (ho, wo)


def patch_moments(p: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The moments of the patches ``p`` [N, D, L] over N and L, in float64.

    Returns:
        mean [D] and biased covariance [D, D], as numpy arrays (see :func:`fold_batch_stats`).
    """
    count = p.shape[0] * p.shape[2]
    # Per image in float32 (sums of L products), over the batch in float64: summing the batch in float32
    # too made BN's output 2.7x further from a float64 reference than nn.BatchNorm2d's; this is as close.
    mean = p.sum(2).numpy().sum(0, dtype=np.float64) / count
    second = torch.bmm(p, p.transpose(1, 2)).numpy().sum(0, dtype=np.float64) / count  # [D, D]: E[p p^T]
    return mean, second - np.outer(mean, mean)


def _shift(mean_p: np.ndarray, cov_p: np.ndarray, channels: int) -> torch.Tensor | None:
    """Per channel [C]: what to subtract from the input for patch moments that keep their precision.

    E[p p^T] - m m^T cancels in float32 when the input sits far from zero: for 100 + 0.01 N(0, 1)
    without padding, BN's output came out 8 away from float64 (``nn.BatchNorm2d``: 6e-3). Shifted by
    about its mean, the padding alike, it is within 1.2e-6; the covariance is the same, and the folded
    bias takes the shift back. The shift is each channel's mean, rounded to a power of two at most its
    std: with few significant bits it leaves exact the values near it. None, for no second pass, where
    every patch value's mean is within 10 std of zero (normalized MNIST: within 1.0-1.4e-6 of float64,
    as ``nn.BatchNorm2d``).

    Args:
        mean_p: The patch mean [D] from :func:`patch_moments`, D = C * kh * kw.
        cov_p: The patch covariance [D, D].
        channels: C.

    Returns:
        [C] float32, or None.
    """
    var = np.maximum(cov_p.diagonal(), 0)
    if (mean_p * mean_p <= 100 * var).all():
        return None
    mean, std = mean_p.reshape(channels, -1).mean(1), np.sqrt(var.reshape(channels, -1).mean(1))
    step = np.exp2(np.floor(np.log2(np.maximum(std, 1e-30))))  # a rough std is enough: 0, the mean
    return torch.from_numpy(np.round(mean / step) * step).float()


def batch_patches(x: torch.Tensor, conv: nn.Conv2d, windows: bool = False
                  ) -> tuple[torch.Tensor, tuple[int, int], np.ndarray, np.ndarray, np.ndarray]:
    """The patches of ``x`` for ``conv`` and their moments, shifted where the input sits far from zero.

    ``windows`` orders the patches by 2x2 window, as :func:`patches` does.

    Returns:
        The patches [N, D, Ho * Wo], (Ho, Wo), their mean [D] and covariance [D, D] in float64, and
        the shift [D] subtracted from each patch row (zeros for none; see :func:`_shift`).

    Raises:
        ValueError: One value per channel, as ``nn.BatchNorm2d`` refuses in training.
    """
    kernel, padding = conv.kernel_size, conv.padding
    with torch.no_grad():
        p, (ho, wo) = patches(x, kernel, padding, windows=windows)  # type: ignore[arg-type]
        if x.shape[0] * ho * wo <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        mean_p, cov_p = patch_moments(p)
        shift_p = np.zeros_like(mean_p)  # [D]: each patch row's shift
        shift = _shift(mean_p, cov_p, x.shape[1])
        if shift is not None:  # a second pass, for inputs far from zero
            p, _ = patches(x, kernel, padding, shift, windows)  # type: ignore[arg-type]
            mean_p, cov_p = patch_moments(p)
            shift_p += shift.double().numpy().repeat(kernel[0] * kernel[1])
            mean_p += shift_p
    return p, (ho, wo), mean_p, cov_p, shift_p
