"""A 2x2, stride-2 max pool for the CPU that gives ``F.max_pool2d``'s values and gradients, faster.

PyTorch's CPU kernel for ``max_pool2d`` (with or without indices) takes about 1 ms for this net's
first pool, [64, 6, 28, 28], on the 2-core machine we measure on: more than that layer's
convolution. Taking the max over column pairs and then over row pairs needs two ``maximum`` ops
on half-strided views, and the backward two multiplications and two subtractions with saved 0/1
masks: the whole training step gets 8-9% faster (``benchmarks/train_speed.py --breakdown``).
``pool_windows`` does the same for a conv output whose positions are ordered by pooling window
(the first pool of `bnpipe.train.step`), with contiguous ops only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable


def _usable(x: torch.Tensor) -> bool:
    """Whether the fast path applies: CPU, contiguous NCHW with even sides, and not being traced.

    Under ``torch.export`` (the ONNX exporter) and ``torch.fx`` (the PyTorch-side fold, whose proxies
    are no tensors) the layer stays ``max_pool2d``, so a traced graph holds one pool node, not the
    ops that build it here.
    """
    return (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() == 4 and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0
            and x.is_contiguous() and not torch.compiler.is_compiling())


def pool_2x2(x: torch.Tensor, masks: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Max over column pairs, then over row pairs. Ties go left, then up: ``max_pool2d``'s scan order.

    Returns:
        The pooled [N, C, H/2, W/2]; with ``masks``, also 0/1 masks in ``x``'s dtype of where the right
        column won [N*C*H, W/2] and where the lower row won [N*C*H/2, W/2]. Not booleans: multiplying
        by a boolean converts it on the fly, and the first pool's backward took 0.95 ms, against 0.17
        with float masks and 0.08 to convert them here.
    """
    n, c, h, w = x.shape
    pairs = x.view(n * c * h, w // 2, 2)
    left, right = pairs[..., 0], pairs[..., 1]
    rows = torch.maximum(left, right).view(n * c * h // 2, 2, w // 2)  # [N*C*H/2, upper/lower, W/2]
    # Written into a tensor of its own shape rather than viewed into it: autograd forbids in-place ops
    # (``nn.ReLU(inplace=True)``) on a view made inside a custom Function, and max_pool2d allows them.
    pooled = x.new_empty(n, c, h // 2, w // 2)
    torch.maximum(rows[:, 0], rows[:, 1], out=pooled.view(n * c * h // 2, w // 2))
    if not masks:
        return pooled, None, None
    return pooled, torch.gt(right, left).to(x.dtype), torch.gt(rows[:, 1], rows[:, 0]).to(x.dtype)


def unpool_2x2(grad: torch.Tensor, took_right: torch.Tensor, took_lower: torch.Tensor) -> torch.Tensor:
    """The backward of :func:`pool_2x2`: the pooled gradient [N, C, H/2, W/2] routed to each window's max.

    Each window's gradient goes to the row that won, then to the column that won; g*1 = g, and
    g - g*1 and g - g*0 are exact, so every value is the incoming gradient or zero, as in
    ``max_pool2d``'s backward.

    Returns:
        The gradient of the pool's input [N, C, H, W].
    """
    n, c, h2, w2 = grad.shape
    grad = grad.reshape(n * c * h2, w2)
    rows = torch.empty(n * c * h2, 2, w2, dtype=grad.dtype)
    torch.mul(grad, took_lower, out=rows[:, 1])
    torch.sub(grad, rows[:, 1], out=rows[:, 0])
    rows = rows.view(n * c * h2 * 2, w2)
    cols = torch.empty(n * c * h2 * 2, w2, 2, dtype=grad.dtype)
    torch.mul(rows, took_right, out=cols[..., 1])
    torch.sub(rows, cols[..., 1], out=cols[..., 0])
    return cols.view(n, c, 2 * h2, 2 * w2)


def pool_windows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 max pool of a conv output whose positions are ordered by window (``patch_stats.patches(windows=True)``).

    Each window's values are in 4 contiguous blocks, which pool with contiguous ops: 5-7% off the
    training step against :func:`pool_2x2` on the interleaved layout, whose strided ops cost 4 times
    as much per value. Ties go left, then up, as in :func:`pool_2x2`.

    Args:
        x: [N, C, 4, L]: window offsets (0, 0), (0, 1), (1, 0), (1, 1) at each of the L pooled positions.

    Returns:
        The pooled [N, C, L] and 0/1 masks [3, N, C, L] in ``x``'s dtype: where the right column won in
        the upper row, where it won in the lower row, and where the lower row won.
    """
    q0, q1, q2, q3 = x.unbind(2)
    upper, lower = torch.maximum(q0, q1), torch.maximum(q2, q3)
    masks = x.new_empty(3, *upper.shape)
    torch.gt(q1, q0, out=masks[0])
    torch.gt(q3, q2, out=masks[1])
    torch.gt(lower, upper, out=masks[2])
    return torch.maximum(upper, lower), masks


def unpool_windows(grad: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The backward of :func:`pool_windows` for the pooled gradient [N, C, L]: [N, C, 4, L], as :func:`unpool_2x2`."""
    out = grad.new_empty(grad.shape[0], grad.shape[1], 4, grad.shape[2])
    lower = torch.mul(grad, masks[2])
    upper = torch.sub(grad, lower)
    torch.mul(upper, masks[0], out=out[:, :, 1])
    torch.sub(upper, out[:, :, 1], out=out[:, :, 0])
    torch.mul(lower, masks[1], out=out[:, :, 3])
    torch.sub(lower, out[:, :, 3], out=out[:, :, 2])
    return out


class _MaxPool2x2(torch.autograd.Function):
    """:func:`pool_2x2` with the backward of ``max_pool2d``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pooled, took_right, took_lower = pool_2x2(x, masks=True)
        ctx.save_for_backward(took_right, took_lower)
        return pooled

    @staticmethod
    @once_differentiable  # a second derivative (create_graph=True) raises rather than going wrong
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return unpool_2x2(grad, *ctx.saved_tensors)  # type: ignore[attr-defined]


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` of [N, C, H, W] ``x`` with even H and W on the CPU: same values, same gradients.

    NaN is the one difference: it propagates through the values, but its gradient goes to the window's
    first element rather than to the NaN (a non-finite loss stops `bnpipe train` anyway).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPool2x2.apply(x)  # type: ignore[no-any-return]
    return pool_2x2(x, masks=False)[0]


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` that takes :func:`max_pool_2x2` where it applies, the stock kernel elsewhere."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool [N, C, H, W] to [N, C, H/2, W/2]."""
        return max_pool_2x2(x) if _usable(x) else super().forward(x)
