"""sgd_step against optimizer.step(): the same parameters and momentum buffers, bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch

from bnpipe.train.sgd import _direct, sgd_step

SETTINGS = [
    {"momentum": 0.9, "weight_decay": 5e-4},
    {"momentum": 0.0},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"momentum": 0.5, "dampening": 0.1},
    {"momentum": 0.9, "maximize": True},
]


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((6, 1, 3, 3), (16,), (10, 400))]


def _set_grads(params: list[torch.nn.Parameter], step: int, skip: int | None = None) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i == skip else torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("settings", SETTINGS)
def test_same_as_optimizer_step_bit_for_bit(settings: dict[str, object]) -> None:
    ref, ours = _params(0), _params(0)
    # Two groups with their own rates, changed between steps as a scheduler does.
    opt_ref = torch.optim.SGD([{"params": ref[:2]}, {"params": ref[2:], "lr": 0.05}], lr=0.1, fused=True, **settings)
    opt_ours = torch.optim.SGD([{"params": ours[:2]}, {"params": ours[2:], "lr": 0.05}], lr=0.1, fused=True, **settings)
    for step in range(6):
        for opt in (opt_ref, opt_ours):
            for group in opt.param_groups:
                group["lr"] *= 0.7
        _set_grads(ref, step)
        _set_grads(ours, step)
        opt_ref.step()
        sgd_step(opt_ours)
        assert _direct(opt_ours)  # from the second step on, the kernel is called directly
        for a, b in zip(ref, ours):
            assert torch.equal(a, b)
            if settings["momentum"]:
                assert torch.equal(opt_ref.state[a]["momentum_buffer"], opt_ours.state[b]["momentum_buffer"])
    assert str(opt_ref.state_dict()) == str(opt_ours.state_dict())


def test_a_parameter_without_gradient_is_left_alone() -> None:
    ref, ours = _params(1), _params(1)
    opt_ref, opt_ours = (torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True) for p in (ref, ours))
    for step in range(4):
        _set_grads(ref, step, skip=1)
        _set_grads(ours, step, skip=1)
        opt_ref.step()
        sgd_step(opt_ours)
        for a, b in zip(ref, ours):
            assert torch.equal(a, b)
    assert ours[1] not in opt_ours.state or opt_ours.state[ours[1]].get("momentum_buffer") is None


def test_step_hooks_and_other_optimizers_take_optimizer_step() -> None:
    params = _params(2)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    for step in range(3):
        _set_grads(params, step)
        sgd_step(opt)
    assert len(calls) == 3
    for other in (torch.optim.SGD(params, lr=0.1, momentum=0.9), torch.optim.Adam(params, fused=True)):
        _set_grads(params, 0)
        other.step()
        assert not _direct(other)
    opt = torch.optim.SGD(params, lr=torch.tensor(0.1), momentum=0.9, fused=True)
    opt.step()
    assert not _direct(opt)  # a rate in a tensor: a CUDA graph's capture reads it there


def test_no_momentum_with_a_scheduler_warns_nothing() -> None:
    params = _params(3)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.0, fused=True)  # no state: the kernel could run at once
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9 ** step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would raise
        for step in range(3):
            _set_grads(params, step)
            sgd_step(opt)
            scheduler.step()
    assert _direct(opt)  # once the scheduler's wrapper has seen a step


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # torch's, on the wrapper
def test_a_step_replaced_on_the_instance_is_called() -> None:
    params = _params(4)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # its own wrapper, under the user's
    calls = []
    plain = opt.step

    def wrapped(*args: object, **kwargs: object) -> None:
        calls.append(1)
        plain(*args, **kwargs)

    opt.step = wrapped  # type: ignore[method-assign]
    for step in range(3):
        _set_grads(params, step)
        sgd_step(opt)
        scheduler.step()
    assert len(calls) == 3
