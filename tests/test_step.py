"""The hand-written training step against stock torch.nn layers in float64, and against the loop's autograd path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnpipe.train import loop, step
from bnpipe.train.model import BNConvNet, build_model, default_arch
from bnpipe.train.recipe import make_scheduler


def _batch(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized digit-like images: a -1 background (ties in every pool window) with a random blob."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 28, 28), -1.0)
    x[:, :, 6:22, 8:20] = torch.rand(n, 1, 16, 12, generator=g) * 2 - 1
    return x, torch.randint(0, 10, (n,), generator=g)


def _net(momentum: float | None = 0.1, conv_bias: bool = False) -> BNConvNet:
    torch.manual_seed(0)
    net = build_model(default_arch("torch"))
    if conv_bias:  # not what build_model makes with BN, but the step must still be autograd's
        net.features[0] = nn.Conv2d(1, 6, 3, padding=1, bias=True)
        net.features[4] = nn.Conv2d(6, 16, 5, bias=True)
    for bn in (net.features[1], net.features[5]):
        bn.momentum = momentum
        with torch.no_grad():  # away from the initial gamma = 1, beta = 0
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-0.5, 0.5)
    return net.train()


def _stock(net: BNConvNet) -> nn.Sequential:
    """The same net and state in stock ``torch.nn`` layers, in float64: a reference sharing none of bnpipe's code."""
    conv1, bn1, _, _, conv2, bn2, _, _ = copy.deepcopy(net.features)
    return nn.Sequential(conv1, bn1, nn.MaxPool2d(2), nn.ReLU(), conv2, bn2, nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                         copy.deepcopy(net.classifier)).double().train()


def _autograd_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What the training loop does without the hand-written step."""
    logits = net(x)
    summed = F.cross_entropy(logits, y, reduction="sum")
    for p in net.parameters():
        p.grad = None
    (summed * scale).backward()
    return summed.detach(), logits.detach()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(u, t.to(u.dtype), rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(("momentum", "conv_bias", "offset"),
                         [(0.1, False, 0.0), (None, False, 0.0), (0.1, True, 0.0), (0.1, False, 100.0)])
def test_a_step_gives_autograds_loss_gradients_and_statistics(momentum: float | None, conv_bias: bool,
                                                              offset: float) -> None:
    # offset 100: inputs far from zero, whose patches the fused first conv + BN shifts in a second pass
    net = _net(momentum, conv_bias)
    reference = _stock(net)
    assert step.applies(net, _batch()[0])
    for seed in range(3):  # three batches: the cumulative average (momentum None) counts them
        x, y = _batch(seed=seed)
        x = x + offset
        want = tuple(t.float() for t in _autograd_step(reference, x.double(), y, 1 / 24))
        got = step.forward_backward(net, x, y, 1 / 24)
        for w, g in zip(want, got):  # loss and logits: float32 rounding against float64
            torch.testing.assert_close(g, w, rtol=1e-6, atol=3e-6)
        # Float32 rounding against float64: within 1e-6 of the largest gradient. A conv bias before BN gets 0,
        # give or take 1e-8.
        scale = max(p.grad.abs().max().item() for p in reference.parameters())  # type: ignore[union-attr]
        for (name, p), q in zip(reference.named_parameters(), net.parameters()):
            assert q.grad is not None, name
            assert q.grad.stride() == q.stride(), f"{name}.grad: fused SGD reads it in the parameter's layout"
            torch.testing.assert_close(q.grad, p.grad.float(), rtol=1e-5, atol=1e-6 * scale,
                                       msg=lambda m: f"{name}.grad: {m}")
        _assert_same_state(reference, net)


def test_the_loop_takes_it_and_trains_as_with_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _batch(200)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    calls = []
    real = step.forward_backward

    def counted(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    def epoch(net: nn.Module) -> tuple[float, float]:
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)  # as trained
        sched = make_scheduler(opt, "onecycle", 4)
        return loop.train_one_epoch(net, x, y, opt, sched, 64, order)

    monkeypatch.setattr(step, "forward_backward", counted)
    fast = _net()
    fast_metrics = epoch(fast)
    assert len(calls) == 4, "the default net on the CPU takes the hand-written step"
    monkeypatch.setattr(step, "applies", lambda model, x: False)
    slow = _net()
    slow_metrics = epoch(slow)
    assert len(calls) == 4
    torch.testing.assert_close(torch.tensor(fast_metrics), torch.tensor(slow_metrics), rtol=1e-5, atol=0)
    _assert_same_state(slow, fast)


def test_where_it_applies_and_where_autograd_takes_the_step() -> None:
    x = _batch(4)[0]
    net = _net()
    assert step.applies(net, x)
    assert not step.applies(nn.Sequential(net), x), "a wrapper such as DDP rides on autograd's hooks"
    assert not step.applies(net.eval(), x)
    net.train()
    with torch.no_grad():
        assert not step.applies(net, x)
    for kind in ("scratch", "none"):
        assert not step.applies(build_model(default_arch(kind)).train(), x), kind
    net.classifier.bias.requires_grad_(False)
    assert not step.applies(net, x), "a frozen parameter must get no gradient"
    net.classifier.bias.requires_grad_(True)
    for module in (net, net.classifier, net.features[3], net.features[6]):
        handle = module.register_forward_hook(lambda *a: None)
        assert not step.applies(net, x), f"a hook on {type(module).__name__} would miss its call"
        handle.remove()
    for register in (net.classifier.weight.register_hook, net.features[0].weight.register_post_accumulate_grad_hook):
        handle = register(lambda *a: None)  # type: ignore[operator]
        assert not step.applies(net, x), f"a parameter hook would miss its call: {register.__name__}"
        handle.remove()
    handle = nn.modules.module.register_module_full_backward_hook(lambda *a: None)
    assert not step.applies(net, x), "a global hook would miss the calls"
    handle.remove()
    assert step.applies(net, x)
    assert not step.applies(net, x.double())
    assert not step.applies(copy.deepcopy(net).double(), x.double())
    assert not step.applies(net, F.pad(x, (2, 2, 2, 2))), "32 x 32: not the net's size"
    strided = copy.deepcopy(net)
    strided.classifier.weight = nn.Parameter(strided.classifier.weight.detach().t().contiguous().t())
    assert not step.applies(strided, x), "fused SGD would read a contiguous gradient in the parameter's layout"
    odd = copy.deepcopy(net)
    odd.features[4] = nn.Conv2d(6, 16, 4)  # an 11 x 11 output: the 2x2 pool needs even sides
    assert not step.applies(odd, x)
    swapped = copy.deepcopy(net)
    swapped.features[2] = nn.MaxPool2d(2)
    assert not step.applies(swapped, x), "a layer that is not the net's"
    swapped = copy.deepcopy(net)
    swapped.features[5] = nn.BatchNorm2d(16, track_running_stats=False)
    assert not step.applies(swapped, x)


@pytest.mark.parametrize("written_out", [True, False])
def test_a_diverged_step_warns_nothing(written_out: bool) -> None:
    """The numpy parts meet inf and NaN silently, as torch's ops do; the loop's loss check reports it once."""
    net = _net()
    with torch.no_grad():
        net.features[0].weight.fill_(float("inf"))
    x, y = _batch(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if written_out:
            summed, _ = step.forward_backward(net, x, y, 1 / 8)
        else:
            summed = F.cross_entropy(net(x), y, reduction="sum")
            summed.backward()
    assert not torch.isfinite(summed)
