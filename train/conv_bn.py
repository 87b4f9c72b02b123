"""The first conv and its BatchNorm in training, computed from the batch's patch moments: one pass fewer.

A conv's output channel ``o`` at each position is ``w_o . p + b_o``, with ``p`` the input patch there
(the im2col row: C_in * kh * kw numbers, 9 for this net's first conv). Over the batch, its mean is
``w_o . m + b_o`` and its biased variance ``w_o^T S w_o``, where ``m`` and ``S`` are the mean and the
covariance of the patches. So training-mode BN of the conv's output is itself a conv over the same
patches, with the weight and bias folded as at export, but with the batch's statistics::

    s = gamma / sqrt(var + eps),   w' = w * s,   b' = beta + (b - mean) * s

One matmul over the patches gives BN's output directly: no pass over the conv's output to normalize
it and none for BN's backward, whose work autograd does on the few numbers of ``m``, ``S`` and
``w``. The moments are summed per image in float32 by one batched matmul, and in float64 over the batch. This pays
only where the patches are few and need no gradient: the first layer, whose input is the data
(``benchmarks/train_speed.py --breakdown`` times it against ``bn(conv(x))``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

MAX_PATCH = 32  # the covariance costs N * L * D^2: beyond a few dozen patch values a plain BN is cheaper


def applies(conv: nn.Module, bn: nn.Module, x: object) -> bool:
    """Whether :func:`conv_bn_train` computes ``bn(conv(x))`` here, exactly as the two modules would.

    It needs: a training step (BN in training mode with running statistics, gradients on), a CPU
    tensor input that needs no gradient (the data), a plain 2-D conv (stride 1, no dilation, one
    group, zero padding) with few patch values, and no hooks on either module, which would miss the
    calls. Anything else (eval, ``torch.fx`` proxies, ``torch.export``) takes the two modules.
    """
    return (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() == 4 and not x.requires_grad
            and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.training and bn.affine
            and bn.track_running_stats and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] <= MAX_PATCH
            and not (conv._forward_hooks or conv._forward_pre_hooks or bn._forward_hooks or bn._forward_pre_hooks))


def patches(x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """The im2col of [N, C, H, W] ``x`` for a stride-1 conv: [N, C * kh * kw, Ho * Wo], channel-major rows."""
    (kh, kw), (ph, pw) = kernel, padding
    xp = F.pad(x, (pw, pw, ph, ph)).contiguous()
    n, c, h, w = xp.shape
    ho, wo = h - kh + 1, w - kw + 1
    sn, sc, sh, sw = xp.stride()
    # [N, C, kh, kw, Ho, Wo]: patch value (c, i, j) at output (y, x) is xp[n, c, y + i, x + j]
    return xp.as_strided((n, c, kh, kw, ho, wo), (sn, sc, sh, sw, sh, sw)).reshape(n, c * kh * kw, ho * wo)


def patch_moments(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and biased covariance [D, D] in float64 of the patches ``p`` [N, D, L] over N and L."""
    count = p.shape[0] * p.shape[2]
    # Per image in float32 (sums of L products), over the batch in float64: summing the batch in float32
    # too made BN's output 2.7x further from a float64 reference than nn.BatchNorm2d's; this is as close.
    mean = p.sum(2).double().sum(0) / count
    second = torch.bmm(p, p.transpose(1, 2)).double().sum(0) / count  # [D, D]: E[p p^T]
    return mean, second - torch.outer(mean, mean)


class _FoldBatchStats(torch.autograd.Function):
    """The conv weight and bias that give BN's training output, and their backward, in float64.

    Autograd would record some 20 ops on vectors of 6 to 54 numbers, forward and backward, each costing
    more than its arithmetic: this does the same math in a few untracked ones. With ``r = 1/sqrt(var + eps)``
    and ``s = gamma * r``::

        mean = w m + b,  var = w^T S w,  w' = w s,  b' = beta + (b - mean) s

    and the backward of these, for incoming gradients ``g_w'`` [C_out, D] and ``g_b'`` [C_out]::

        g_s = sum_d(g_w' w) + g_b' (b - mean),  g_gamma = g_s r,  g_beta = g_b',  g_var = -g_s s r^2 / 2
        g_w = g_w' s - g_b' s m^T + 2 g_var (S w),  g_b = g_b' s - g_b' s = 0

    (``tests/test_conv_bn.py`` checks it against autograd with ``torch.autograd.gradcheck``.)
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor,  # type: ignore[override]
                beta: torch.Tensor, mean_p: torch.Tensor, cov_p: torch.Tensor, eps: float,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        w64, b64 = w.double(), b.double()
        mean = torch.addmv(b64, w64, mean_p)
        sw = w64 @ cov_p  # [C_out, D]: S w, per output channel (S is symmetric)
        var = (sw * w64).sum(1).clamp_min_(0)  # biased, as BN normalizes with
        r = (var + eps).rsqrt_()
        scale = gamma.double() * r
        weight = w64 * scale[:, None]
        bias = beta.double() + (b64 - mean) * scale
        ctx.save_for_backward(w64, b64, mean, sw, r, scale, mean_p)
        ctx.mark_non_differentiable(mean, var)
        ctx.dtype = w.dtype  # type: ignore[attr-defined]
        return weight.to(w.dtype), bias.to(w.dtype), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, g_weight: torch.Tensor, g_bias: torch.Tensor,  # type: ignore[override]
                 _g_mean: torch.Tensor, _g_var: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w64, b64, mean, sw, r, scale, mean_p = ctx.saved_tensors  # type: ignore[attr-defined]
        g_weight, g_bias = g_weight.double(), g_bias.double()
        g_scale = (g_weight * w64).sum(1) + g_bias * (b64 - mean)
        g_var = g_scale * scale * r * r * -0.5
        g_w = g_weight * scale[:, None] - torch.outer(g_bias * scale, mean_p) + 2 * g_var[:, None] * sw
        dtype = ctx.dtype  # type: ignore[attr-defined]
        return g_w.to(dtype), torch.zeros_like(b64, dtype=dtype), (g_scale * r).to(dtype), g_bias.to(dtype), None, None, None


def conv_bn_train(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))`` in training mode, the running statistics updated as ``nn.BatchNorm2d`` does.

    Args:
        x: The input [N, C, H, W]; see :func:`applies` for when this function may stand in.
        conv: A stride-1 ``nn.Conv2d`` with zero padding, with or without bias.
        bn: The ``nn.BatchNorm2d`` after it, in training mode.

    Returns:
        BN's output [N, C_out, Ho, Wo].
    """
    p = patches(x, conv.kernel_size, conv.padding)  # type: ignore[arg-type]
    n, _, length = p.shape
    count = n * length
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    with torch.no_grad():
        mean_p, cov_p = patch_moments(p)
    w = conv.weight.flatten(1)  # [C_out, D]
    b = conv.bias if conv.bias is not None else w.new_zeros(w.shape[0])
    weight, bias, mean, var = _FoldBatchStats.apply(w, b, bn.weight, bn.bias, mean_p, cov_p, bn.eps)
    _update_running_stats(bn, mean, var * (count / (count - 1)))
    out = torch.baddbmm(bias.view(1, -1, 1), weight.expand(n, -1, -1), p)  # [N, C_out, Ho * Wo]
    ho = x.shape[2] + 2 * conv.padding[0] - conv.kernel_size[0] + 1  # type: ignore[index]
    return out.view(n, -1, ho, length // ho)


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    """``nn.BatchNorm2d``'s update in training: count the batch, then average with its momentum."""
    bn.num_batches_tracked.add_(1)  # type: ignore[union-attr]
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)  # None: cumulative
    bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)  # type: ignore[union-attr]
    bn.running_var.mul_(1 - factor).add_(unbiased_var.to(bn.running_var.dtype), alpha=factor)  # type: ignore[union-attr]
