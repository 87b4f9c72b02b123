"""The fused first conv + BN of a training step against ``bn(conv(x))`` with stock modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnpipe.train import conv_bn, patch_stats
from bnpipe.train.model import build_model, default_arch


def _pair(in_channels: int = 1, bias: bool = False, momentum: float | None = 0.1,
          seed: int = 0) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(in_channels, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():  # away from the initial gamma = 1, beta = 0, with a negative scale too
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return conv, bn


def _digits(n: int = 32, in_channels: int = 1) -> torch.Tensor:
    """Normalized images like MNIST's: a background of -1 with a brighter blob, so the BN variance is small."""
    torch.manual_seed(1)
    x = torch.full((n, in_channels, 28, 28), -1.0)
    x[:, :, 8:20, 10:18] = torch.rand(n, in_channels, 12, 8) * 2 - 1
    return x


@pytest.mark.parametrize(("in_channels", "bias", "momentum"),
                         [(1, False, 0.1), (1, True, 0.1), (2, False, None), (1, False, 1.0)])
def test_fused_equals_bn_of_conv(in_channels: int, bias: bool, momentum: float | None) -> None:
    conv, bn = _pair(in_channels, bias, momentum)
    fused_conv, fused_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    exact_conv, exact_bn = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()  # float64 stock modules
    x = _digits(in_channels=in_channels)
    assert conv_bn.applies(fused_conv, fused_bn, x)
    for _ in range(2):  # twice: the cumulative average (momentum None) uses the batch count; 1.0 keeps the last
        bn(conv(x))
        exact, got = exact_bn(exact_conv(x.double())), conv_bn.conv_bn_train(x, fused_conv, fused_bn)
        # float32 rounding of outputs up to ~10: nn.BatchNorm2d itself is 1.2e-6 to 1.8e-6 off here
        torch.testing.assert_close(got.double(), exact, atol=3e-7 * exact.abs().max().item(), rtol=0)
        g = torch.randn_like(got)
        params = [fused_conv.weight, fused_bn.weight, fused_bn.bias, *([fused_conv.bias] if bias else [])]
        grads = torch.autograd.grad(got, params, g)
        exact_grads = torch.autograd.grad(exact, [exact_conv.weight, exact_bn.weight, exact_bn.bias], g.double())
        for a, b in zip(exact_grads, grads):  # float32 sums of 25,000 products: within 5e-6 of the largest
            torch.testing.assert_close(b.double(), a, atol=5e-6 * a.abs().max().item(), rtol=0)
        if bias:  # BN cancels the conv's bias: its gradient is 0
            torch.testing.assert_close(grads[3], torch.zeros(6), atol=1e-6, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # against the float32 stock BN
        torch.testing.assert_close(getattr(fused_bn, name), getattr(bn, name), atol=1e-6, rtol=1e-6)


def test_fused_is_as_close_to_float64_as_the_stock_modules() -> None:
    conv, bn = _pair()
    x = _digits(64)
    exact = copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x.double()))
    stock = (bn(conv(x)).double() - exact).abs().max().item()
    fused = (conv_bn.conv_bn_train(x, conv, bn).double() - exact).abs().max().item()
    assert fused <= 2 * stock, (fused, stock)  # 1.0x to 1.6x in our trials


def test_an_input_far_from_zero_loses_no_precision() -> None:
    # Without padding the patches are the data alone: 100 + 0.01 N(0, 1) has E[p p^T] 1e8 times its covariance.
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6)
    x = 100 + 0.01 * torch.randn(32, 1, 28, 28)
    exact = copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x.double()))
    got = conv_bn.conv_bn_train(x, conv, bn)
    assert (got.double() - exact).abs().max().item() < 1e-5  # nn.BatchNorm2d itself: 6e-3


def test_the_hand_written_backward_is_autograds() -> None:
    torch.manual_seed(0)
    d = 9
    p = torch.randn(4, d, 30, dtype=torch.float64)
    mean_p, cov_p = patch_stats.patch_moments(p)
    shift = torch.randn(d, dtype=torch.float64).numpy()
    w, b, gamma, beta = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((6, d), (6,), (6,), (6,)))
    assert torch.autograd.gradcheck(
        lambda *a: conv_bn._FoldBatchStats.apply(*a, mean_p, cov_p, shift, 1e-5)[:2], (w, b, gamma, beta))


def test_patch_moments_are_the_im2col_moments() -> None:
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64)
    p, spatial = patch_stats.patches(x, (3, 3), (1, 1))
    assert spatial == (7, 6)
    unfold = F.unfold(x, 3, padding=1)  # [N, C * 9, L], torch's own im2col
    torch.testing.assert_close(p, unfold, atol=0, rtol=0)
    rows = unfold.transpose(1, 2).reshape(-1, 18)
    mean, cov = patch_stats.patch_moments(p)
    torch.testing.assert_close(torch.from_numpy(mean), rows.mean(0))
    torch.testing.assert_close(torch.from_numpy(cov), torch.cov(rows.T, correction=0))


def test_patches_by_window_are_the_im2col_columns_reordered() -> None:
    x = torch.randn(2, 2, 6, 8)
    p, spatial = patch_stats.patches(x, (3, 3), (1, 1), windows=True)
    assert spatial == (6, 8)
    # column (y, x) of torch's im2col goes to (y % 2, x % 2, y // 2, x // 2)
    unfold = F.unfold(x, 3, padding=1).view(2, 18, 3, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 18, 48)
    torch.testing.assert_close(p, unfold, atol=0, rtol=0)


def test_when_it_applies() -> None:
    conv, bn = _pair()
    x = _digits(4)
    assert conv_bn.applies(conv, bn, x)
    assert not conv_bn.applies(conv, bn, x.clone().requires_grad_())  # not the data: its patches need a gradient
    assert not conv_bn.applies(conv, bn.eval(), x)
    bn.train()
    with torch.no_grad():  # precise BN and other statistics passes run without gradients
        assert not conv_bn.applies(conv, bn, x)
    for register in (bn.register_forward_pre_hook, bn.register_forward_hook, bn.register_full_backward_hook,
                     conv.register_forward_hook, conv.register_full_backward_pre_hook):
        handle = register(lambda *a: None)  # type: ignore[operator]
        assert not conv_bn.applies(conv, bn, x), f"a hook would miss its call: {register.__name__}"
        handle.remove()
    container = nn.Sequential(conv, bn)
    handle = container.register_forward_hook(lambda *a: None)
    assert not conv_bn.applies(conv, bn, x, container), "the container's hook would miss its call"
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    assert not conv_bn.applies(conv, bn, x), "a global hook would miss the calls"
    handle.remove()
    assert conv_bn.applies(conv, bn, x, container)
    assert not conv_bn.applies(conv, bn, x.double()), "the precision is measured for float32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv_bn.applies(conv, bn, x)
    assert not conv_bn.applies(nn.Conv2d(1, 6, 3, padding=1, padding_mode="reflect"), bn, x)
    assert not conv_bn.applies(nn.Conv2d(1, 6, 3, dilation=2), bn, x)
    assert not conv_bn.applies(nn.Conv2d(1, 6, 3, stride=2), bn, x)
    assert not conv_bn.applies(nn.Conv2d(6, 6, 3, groups=2), bn, x)
    assert not conv_bn.applies(nn.Conv2d(4, 6, 3), bn, x), "36 patch values: a plain BN is cheaper"
    assert not conv_bn.applies(conv, nn.BatchNorm2d(6, affine=False), x)
    assert not conv_bn.applies(conv, nn.SyncBatchNorm(6), x)


def test_one_value_per_channel_is_refused_as_torch_does() -> None:
    conv, bn = _pair()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        conv_bn.conv_bn_train(torch.zeros(1, 1, 1, 1), conv, bn)


def test_the_net_takes_the_fused_path_and_trains_as_with_stock_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    fused = build_model(default_arch("torch"))
    stock = copy.deepcopy(fused)
    stock.features[1].register_forward_hook(lambda m, i, o: None)  # any hook keeps the stock modules
    calls: list[int] = []
    real = conv_bn.conv_bn_train

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(conv_bn, "conv_bn_train", counted)
    x, y = _digits(64), torch.arange(64) % 10
    for model in (fused, stock):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert len(calls) == 1, "the fused path ran for the plain net only"
    for (name, a), b in zip(fused.state_dict().items(), stock.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    with torch.no_grad():  # eval takes the stock modules
        torch.testing.assert_close(fused.eval()(x), stock.eval()(x), atol=1e-5, rtol=0)
    assert len(calls) == 1
