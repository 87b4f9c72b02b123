"""A CPU training step of the net with its backward written out: autograd's gradients, without its graph.

At batch 64 a step of this small net spent a third of its time outside the arithmetic: recording
and replaying some 60 autograd nodes, views, and ops on a few hundred numbers (``benchmarks/
train_speed.py --breakdown``, "step of 2 images"). Here each layer's backward is the aten op that
autograd's own node calls (``convolution_backward``, ``native_batch_norm_backward``,
``threshold_backward``, the loss's), or the function behind the layer's autograd Function (the
first conv + BN, the second pool); the second conv's weight gradient is taken from channels_last
copies, which oneDNN runs faster here. One thing differs from the modules' forward: the first conv's
output positions are ordered by pooling window, so that the first pool runs on contiguous blocks
(`bnpipe.train.maxpool.pool_windows`). The loss, the gradients and the running statistics are the
autograd path's up to float32 rounding (``tests/test_step.py`` compares them). It takes the default
net in one process; anything else (DDP, whose gradient hooks ride on autograd, other BN kinds,
hooks on modules or parameters, frozen parameters, eval, another dtype) takes ``model(x)`` and
``backward()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnpipe.train import conv_bn
from bnpipe.train.patch_stats import batch_patches
from bnpipe.train.batchnorm import batch_momentum
from bnpipe.train.maxpool import MaxPool2x2, pool_2x2, pool_windows, unpool_2x2, unpool_windows
from bnpipe.train.model import BNConvNet
from bnpipe.train.sgd import sgd_step

aten = torch.ops.aten
_LAYERS = (nn.Conv2d, nn.BatchNorm2d, MaxPool2x2, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, MaxPool2x2, nn.ReLU)


def applies(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`forward_backward` gives ``model``'s training step on a batch like ``x``.

    Args:
        model: The net being trained.
        x: A batch of normalized images [N, 1, 28, 28].

    Returns:
        True for a bare :class:`BNConvNet` with ``nn.BatchNorm2d`` in training mode, float32 on the CPU,
        every parameter trained and contiguous (fused SGD reads a gradient in its parameter's layout, and
        the gradients here are contiguous), no module or parameter hooks, both convs' outputs of even
        sides for the 2x2 pools, and where the first conv + BN may be fused.
    """
    if type(model) is not BNConvNet or tuple(type(m) for m in model.features) != _LAYERS \
            or type(model.classifier) is not nn.Linear or model.classifier.bias is None:
        return False
    conv1, bn2, conv2 = model.features[0], model.features[5], model.features[4]
    params = list(model.parameters())
    if not (isinstance(conv1.padding, tuple) and isinstance(conv2.padding, tuple)):
        return False
    side1 = x.shape[-1] + 2 * conv1.padding[1] - conv1.kernel_size[1] + 1  # the first conv's output, square input
    side2 = side1 // 2 + 2 * conv2.padding[1] - conv2.kernel_size[1] + 1
    return (model.training and bn2.training and bn2.affine and bn2.track_running_stats
            and all(p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous()
                    for p in params) and not conv_bn.params_hooked(params)
            and conv2.padding_mode == "zeros" and conv2.stride == (1, 1) and conv2.dilation == (1, 1)
            and conv2.groups == 1 and conv1.padding[0] == conv1.padding[1]
            and conv1.kernel_size[0] == conv1.kernel_size[1] and conv2.padding[0] == conv2.padding[1]
            and conv2.kernel_size[0] == conv2.kernel_size[1]
            and x.shape[-2:] == (28, 28) and side1 % 2 == 0 and side2 % 2 == 0  # the classifier's size; 2x2 pools
            and not conv_bn.hooked(model, *model.modules())
            and conv_bn.applies(conv1, model.features[1], x))


@torch.no_grad()
@conv_bn.QUIET
def forward_backward(model: BNConvNet, x: torch.Tensor, y: torch.Tensor,
                     loss_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass, summed cross-entropy and backward of ``model`` on one batch; see :func:`applies`.

    Sets each parameter's ``.grad`` to the gradient of ``loss_scale * loss`` (as ``zero_grad(set_to_none=True)``
    then ``backward()`` would) and updates the BN running statistics as the training forward does.

    Args:
        model: The net, for which :func:`applies` holds.
        x: Normalized images [N, 1, 28, 28].
        y: Labels [N].
        loss_scale: The weight of the summed loss in the gradient (1 / N for the batch mean).

    Returns:
        The summed loss (a scalar) and the logits [N, classes], both without a graph.
    """
    conv1, bn1, _, _, conv2, bn2, _, _ = model.features
    fc, n = model.classifier, x.shape[0]
    # The first conv + BN: one matmul over the patches with the weight and bias folded with the batch's statistics.
    # Its output positions are ordered by pooling window, which the first pool takes as they are: the
    # layout never needs undoing, as the gradient of that output only meets the same patches again.
    p, (ho, wo), mean_p, cov_p, shift_p = batch_patches(x, conv1, windows=True)
    w1, b1 = conv_bn.weight_and_bias(conv1)  # [6, 9], and [6] or None
    weight, bias, mean, var, folded = conv_bn.fold_batch_stats(w1, b1, bn1.weight, bn1.bias, mean_p, cov_p,
                                                               shift_p, bn1.eps)
    conv_bn.record_batch(bn1, mean, var, n * ho * wo)
    c1 = weight.shape[0]
    a1 = conv_bn.folded_conv(p, weight, bias).view(n, c1, 4, -1)  # [N, 6, 4, 196]
    h1, pool1 = pool_windows(a1)
    h1 = h1.view(n, c1, ho // 2, wo // 2).relu_()  # [N, 6, 14, 14]; the result is the ReLU's mask, as in autograd
    a2 = F.conv2d(h1, conv2.weight, conv2.bias, conv2.stride, conv2.padding, conv2.dilation, conv2.groups)
    bn2.num_batches_tracked.add_(1)  # type: ignore[union-attr]
    z2, saved_mean, saved_invstd = torch.native_batch_norm(  # [N, 16, 10, 10], running statistics updated
        a2, bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, True,
        batch_momentum(bn2.momentum, bn2.num_batches_tracked), bn2.eps)  # type: ignore[arg-type]
    h2, *pool2 = pool_2x2(z2, masks=True)
    h2.relu_()  # [N, 16, 5, 5]
    features = h2.view(n, -1)
    logits = torch.addmm(fc.bias, features, fc.weight.t())  # [N, 10]
    log_probs = torch.log_softmax(logits, 1)
    summed = F.nll_loss(log_probs, y, reduction="sum")

    # Backward, layer by layer from the loss.
    g = aten.nll_loss_backward(summed.new_tensor(loss_scale), log_probs, y, None, 2, -100,  # 2: sum
                                summed.new_ones(()))  # total weight, which a sum does not use
    g = aten._log_softmax_backward_data(g, log_probs, 1, log_probs.dtype)  # [N, 10]
    fc.weight.grad, fc.bias.grad = g.t().mm(features), g.sum(0)
    g = unpool_2x2(aten.threshold_backward(g.mm(fc.weight).view_as(h2), h2, 0), *pool2)  # [N, 16, 10, 10]
    g, bn2.weight.grad, bn2.bias.grad = aten.native_batch_norm_backward(
        g, a2, bn2.weight, bn2.running_mean, bn2.running_var, saved_mean, saved_invstd, True, bn2.eps,
        [True, True, True])
    # The weight gradient from channels_last copies: oneDNN's kernel for 6 input channels runs 2x faster on
    # them (0.17 ms against 0.37 in NCHW, 0.32 as a forward conv of the transposed batch; the copies cost 0.06).
    # Contiguous, as the parameter: fused SGD walks a gradient's memory in the parameter's order.
    cl = torch.channels_last
    conv2.weight.grad = conv_backward(g.contiguous(memory_format=cl), h1.contiguous(memory_format=cl), conv2,
                                      weight=True).contiguous()
    if conv2.bias is not None:
        conv2.bias.grad = g.sum((0, 2, 3))
    g = conv_backward(g, h1, conv2, weight=False)  # [N, 6, 14, 14]
    g = unpool_windows(aten.threshold_backward(g, h1, 0).view(n, c1, -1), pool1).view(n, c1, -1)  # [N, 6, 784]
    # The folded conv's backward, as autograd's for baddbmm of the expanded weight, then the fold's.
    grads = conv_bn.fold_batch_stats_backward(folded, torch.bmm(g, p.transpose(1, 2)).sum(0), g.sum((0, 2)))
    conv1.weight.grad = grads[0].view_as(conv1.weight)
    if conv1.bias is not None:
        conv1.bias.grad = grads[1]
    bn1.weight.grad, bn1.bias.grad = grads[2], grads[3]
    return summed, logits


def conv_backward(grad: torch.Tensor, inputs: torch.Tensor, conv: nn.Conv2d, weight: bool) -> torch.Tensor:
    """The gradient of ``conv``'s weight (``weight``) or of its ``inputs`` [N, C_in, H, W], from the gradient
    ``grad`` [N, C_out, Ho, Wo] of its output: the aten op autograd's node calls, in the layout of its operands."""
    grads = aten.convolution_backward(grad, inputs, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                                      False, [0, 0], conv.groups, [not weight, weight, False])
    return grads[1] if weight else grads[0]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               loss_scale: float, loss_sum: torch.Tensor, correct: torch.Tensor, written_out: bool = False) -> None:
    """One optimizer step on a batch; its summed loss and correct count are added to device scalars.

    Nothing here reads a value back to the host, so a CUDA graph can hold the whole step
    (`bnpipe.train.graphed`).

    Args:
        model: The net, in training mode.
        optimizer: Steps the model's parameters.
        x: The normalized batch [N, 1, H, W].
        y: Its labels [N].
        loss_scale: Multiplies the summed loss before the backward pass (1/N for the batch mean).
        loss_sum: Receives the summed cross-entropy (a scalar on the model's device).
        correct: Receives the count of right argmaxes (a scalar on the model's device).
        written_out: Take :func:`forward_backward` (where :func:`applies`) instead of autograd.
    """
    if written_out:
        summed, logits = forward_backward(model, x, y, loss_scale)  # type: ignore[arg-type]
    else:
        optimizer.zero_grad(set_to_none=True)  # at capture: the gradients are then allocated in the graph's pool
        logits = model(x)
        summed = F.cross_entropy(logits, y, reduction="sum")
        (summed * loss_scale).backward()
    sgd_step(optimizer)
    loss_sum += summed.detach()
    correct += (logits.detach().argmax(1) == y).sum()
