"""The first conv and its BatchNorm in training, computed from the batch's patch moments: one pass fewer.

A conv's output channel ``o`` at each position is ``w_o . p + b_o``, with ``p`` the input patch there
(the im2col row: C_in * kh * kw numbers, 9 for this net's first conv). Over the batch, its mean is
``w_o . m + b_o`` and its biased variance ``w_o^T S w_o``, where ``m`` and ``S`` are the mean and the
covariance of the patches. So training-mode BN of the conv's output is itself a conv over the same
patches, with the weight and bias folded as at export, but with the batch's statistics::

    s = gamma / sqrt(var + eps),   w' = w * s,   b' = beta + (b - mean) * s

One matmul over the patches gives BN's output directly: no pass over the conv's output to normalize
it and none for BN's backward, whose work is done on the few numbers of ``m``, ``S`` and ``w``
(:func:`fold_batch_stats_backward`, in numpy float64). The patches and their moments come from
`bnpipe.train.patch_stats`. This pays only where the patches are few and need no gradient: the first layer, whose input
is the data (``benchmarks/train_speed.py --breakdown`` times it against ``bn(conv(x))``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from bnpipe.train.batchnorm import batch_momentum, update_moving_stats
from bnpipe.train.patch_stats import batch_patches

# The numpy parts of a step overflow to inf and NaN silently, as torch does: a diverging run then stops at
# the loop's loss check with one line, not after a screen of numpy RuntimeWarnings. A decorator only: each
# call then keeps its own state (``with QUIET`` could not nest).
QUIET = np.errstate(all="ignore")
MAX_PATCH = 32  # the covariance costs N * L * D^2: beyond a few dozen patch values a plain BN is cheaper
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def hooked(*modules: nn.Module) -> bool:
    """Whether any module hook, global or on one of ``modules``, would expect the modules' own calls."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return (any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS)
            or any(getattr(m, kind, None) for m in modules for kind in kinds))


def params_hooked(params: Iterable[torch.Tensor]) -> bool:
    """Whether a gradient hook (``register_hook``, post-accumulate) waits on one of ``params``."""
    return any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in params)


def applies(conv: nn.Module, bn: nn.Module, x: object, container: nn.Module | None = None) -> bool:
    """Whether :func:`conv_bn_train` may stand in for ``bn(conv(x))``, exactly as the two modules compute it.

    It needs a training step (BN in training mode with running statistics, gradients on, no tracing);
    a float32 CPU input that needs no gradient (the data; autocast off); a plain 2-D conv (stride 1, no
    dilation, one group, zero padding) with few patch values; and no hooks on either module or on the
    ``container`` that calls them, which would miss the calls. Anything else (eval, ``torch.fx`` proxies,
    ``torch.export``, precise BN's hooks) takes the two modules. Like the CPU max pool, its backward
    cannot be differentiated again (``create_graph=True`` raises).

    Args:
        conv: The conv.
        bn: The BN that takes the conv's output.
        x: The conv's input.
        container: The module that would call the two, if its hooks matter too.

    Returns:
        True where the fused path gives the two modules' results.
    """
    return (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() == 4 and not x.requires_grad
            and x.dtype == torch.float32 and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.training and bn.affine
            and bn.track_running_stats and conv.weight.dtype == bn.weight.dtype == torch.float32
            and bn.running_mean.dtype == bn.running_var.dtype == torch.float32  # updated as numpy views
            and bn.running_mean.device.type == "cpu"
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] <= MAX_PATCH
            and not hooked(conv, bn, *([container] if container is not None else [])))


def fold_batch_stats(w: torch.Tensor, b: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor,
                     mean_p: np.ndarray, cov_p: np.ndarray, shift: np.ndarray, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """The conv weight and bias that give BN's training output, computed in float64.

    With ``r = 1/sqrt(var + eps)`` and ``s = gamma * r``, for patches shifted by ``k`` (their mean ``m``
    is of the unshifted ones)::

        mean = w m + b,  var = w^T S w,  w' = w s,  b' = beta + (b - mean) s + w' k

    The math is in numpy: on a few dozen numbers an op costs about 1 us there and 5 to 10 us in torch,
    and a training step runs some 40 of them, forward and backward. The tensors are read through
    ``.data`` rather than ``.detach()``, which goes through the dispatcher: in a training step, between
    large ops, each dispatch costs several times what it does alone.

    Args:
        w: The conv weight [C_out, D], flattened.
        b: The conv bias [C_out], or None for none.
        gamma: BN's weight [C_out].
        beta: BN's bias [C_out].
        mean_p: The patch mean [D].
        cov_p: The patch covariance [D, D].
        shift: What each patch row was shifted by [D].
        eps: BN's eps.

    Returns:
        w' [C_out, D] and b' [C_out] in ``w``'s dtype; the batch mean and biased variance [C_out] in
        float64 numpy; and what :func:`fold_batch_stats_backward` takes.
    """
    w_np = w.data.numpy()
    w64, g64, beta64 = (t.data.numpy().astype(np.float64) for t in (w, gamma, beta))
    b64 = b.data.numpy().astype(np.float64) if b is not None else np.zeros(len(w64))
    mean = w64 @ mean_p + b64
    sw = w64 @ cov_p  # [C_out, D]: S w, per output channel (S is symmetric)
    var = np.maximum((sw * w64).sum(1), 0)  # biased, as BN normalizes with
    r = 1 / np.sqrt(var + eps)
    scale = g64 * r
    weight = w64 * scale[:, None]
    bias = beta64 + (b64 - mean) * scale + weight @ shift
    return (torch.from_numpy(weight.astype(w_np.dtype)), torch.from_numpy(bias.astype(w_np.dtype)), mean, var,
            (w64, b64, mean, sw, r, scale, mean_p, shift, w_np.dtype, b is not None))


def fold_batch_stats_backward(saved: tuple[object, ...], g_weight: torch.Tensor, g_bias: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The backward of :func:`fold_batch_stats`, in float64, for incoming gradients of ``w'`` and ``b'``.

    ::

        g_s = sum_d((g_w' + g_b' k^T) w) + g_b' (b - mean),  g_gamma = g_s r,  g_beta = g_b'
        g_var = -g_s s r^2 / 2,  g_w = (g_w' + g_b' k^T) s - g_b' s m^T + 2 g_var (S w)
        g_b = g_b' s - g_b' s = 0

    Args:
        saved: What :func:`fold_batch_stats` returned for it.
        g_weight: The gradient of ``w'`` [C_out, D].
        g_bias: The gradient of ``b'`` [C_out].

    Returns:
        The gradients of ``w``, ``b`` (None for no bias), ``gamma`` and ``beta``, in the parameters' dtype.
    """
    w64, b64, mean, sw, r, scale, mean_p, shift, dtype, has_bias = saved
    g_b = g_bias.numpy().astype(np.float64)
    g_weight64 = g_weight.numpy() + np.outer(g_b, shift)  # float64: w' also reaches b' through the shift
    g_scale = (g_weight64 * w64).sum(1) + g_b * (b64 - mean)
    g_var = g_scale * scale * r * r * -0.5
    g_w = g_weight64 * scale[:, None] - np.outer(g_b * scale, mean_p) + 2 * g_var[:, None] * sw
    g_w_out = torch.from_numpy(g_w.astype(dtype))
    g_b_conv = torch.zeros_like(g_w_out[:, 0]) if has_bias else None
    return g_w_out, g_b_conv, torch.from_numpy((g_scale * r).astype(dtype)), g_bias  # g_bias: already in w's dtype


class _FoldBatchStats(torch.autograd.Function):
    """:func:`fold_batch_stats` with its hand-derived backward.

    Autograd would record some 20 ops on vectors of 6 to 54 numbers, forward and backward, each costing
    more than its arithmetic: this does the same math in a few untracked ones (``tests/test_conv_bn.py``
    checks it against autograd with ``torch.autograd.gradcheck``).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w: torch.Tensor,  # type: ignore[override]
                b: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor, mean_p: np.ndarray,
                cov_p: np.ndarray, shift: np.ndarray, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        weight, bias, mean, var, saved = fold_batch_stats(w, b, gamma, beta, mean_p, cov_p, shift, eps)
        ctx.folded = saved  # type: ignore[attr-defined]  # numpy arrays, which autograd does not track
        mean_t, var_t = torch.from_numpy(mean), torch.from_numpy(var)
        ctx.mark_non_differentiable(mean_t, var_t)
        return weight, bias, mean_t, var_t

    @staticmethod
    @once_differentiable
    @QUIET
    def backward(ctx: torch.autograd.function.FunctionCtx, g_weight: torch.Tensor,  # type: ignore[override]
                 g_bias: torch.Tensor, _g_mean: torch.Tensor, _g_var: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = fold_batch_stats_backward(ctx.folded, g_weight, g_bias)  # type: ignore[attr-defined]
        return (*grads, None, None, None, None)


def weight_and_bias(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The conv's weight flattened to [C_out, D] and its bias [C_out] (None for none), as the fold takes them."""
    return conv.weight.flatten(1), conv.bias


def folded_conv(p: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The conv over patches ``p`` [N, D, L] with the folded ``weight`` [C_out, D] and ``bias``: [N, C_out, L]."""
    return torch.baddbmm(bias.view(1, -1, 1), weight.expand(p.shape[0], -1, -1), p)


def record_batch(bn: nn.BatchNorm2d, mean: np.ndarray, var: np.ndarray, count: int) -> None:
    """Count the batch and update ``bn``'s running statistics (on the CPU) with its mean and biased variance
    [C_out] (numpy), as BN does."""
    bn.num_batches_tracked.add_(1)  # type: ignore[union-attr]
    update_moving_stats(bn.running_mean.numpy(), bn.running_var.numpy(), mean, var, count,  # type: ignore[union-attr]
                        batch_momentum(bn.momentum, bn.num_batches_tracked))  # type: ignore[arg-type]


@QUIET
def conv_bn_train(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))`` in training mode, the running statistics updated as ``nn.BatchNorm2d`` does.

    Where the input sits far from zero, the patches are taken of it minus about its mean per channel
    (see `bnpipe.train.patch_stats`).

    Args:
        x: The input [N, C, H, W]; see :func:`applies` for when this function may stand in.
        conv: A stride-1 ``nn.Conv2d`` with zero padding, with or without bias.
        bn: The ``nn.BatchNorm2d`` after it, in training mode.

    Returns:
        BN's output [N, C_out, Ho, Wo].

    Raises:
        ValueError: One value per channel, as ``nn.BatchNorm2d`` refuses in training.
    """
    n = x.shape[0]
    p, (ho, wo), mean_p, cov_p, shift_p = batch_patches(x, conv)
    w, b = weight_and_bias(conv)
    weight, bias, mean, var = _FoldBatchStats.apply(w, b, bn.weight, bn.bias, mean_p, cov_p, shift_p, bn.eps)
    record_batch(bn, mean.numpy(), var.numpy(), n * ho * wo)
    return folded_conv(p, weight, bias).view(n, -1, ho, wo)
