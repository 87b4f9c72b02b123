"""The CUDA-graph training step against the eager loop. On a machine without CUDA only `applies` is checked."""

from __future__ import annotations

import pytest
import torch

from bnpipe.train import graphed, loop
from bnpipe.train.model import build_model, default_arch
from bnpipe.train.recipe import make_deterministic, make_scheduler

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _run(device: torch.device, cuda_graph: bool, epochs: int = 2, n: int = 64 * 9 + 10, momentum: float = 0.9,
         momentum_at: int | None = None, then: float = 0.5
         ) -> tuple[dict[str, torch.Tensor], list[tuple[float, float]], dict[str, torch.Tensor]]:
    """Train the default net from one seed; the last batch of each epoch (10 images) is a partial one.

    Returns the state dict, each epoch's metrics and the momentum buffers; ``momentum_at``: the step after
    which the momentum becomes ``then``, as a scheduler would set it.
    """
    g = torch.Generator().manual_seed(0)
    inputs = (torch.rand(n, 1, 28, 28, generator=g) * 2 - 1).to(device)
    labels = torch.randint(0, 10, (n,), generator=g).to(device)
    torch.manual_seed(0)
    model = build_model(default_arch("torch")).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=5e-4, fused=True)
    sched = make_scheduler(opt, "onecycle", epochs * 10)
    metrics = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        # momentum_at: a scheduler-like change of a setting that a capture holds, after that step
        change = (lambda i: opt.param_groups[0].update(momentum=then) if i == momentum_at else None)
        metrics.append(loop.train_one_epoch(model, inputs, labels, opt, sched, 64, order, cuda_graph=cuda_graph,
                                            after_step=change))
    buffers = {id(p): opt.state[p].get("momentum_buffer") for p in model.parameters()}
    return model.state_dict(), metrics, {k: buffers[id(p)] for k, p in model.named_parameters()}


def _sgd(model: torch.nn.Module, fused: bool = True) -> torch.optim.SGD:
    """SGD as bnpipe trains with it (fused), or the per-tensor loop."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)


def test_applies_needs_cuda() -> None:
    model = build_model(default_arch("torch"))
    assert not graphed.applies(model, _sgd(model), torch.zeros(2, 1, 28, 28), distributed=False)


@cuda
def test_applies_on_cuda() -> None:
    device = torch.device("cuda")
    x = torch.zeros(2, 1, 28, 28, device=device)
    model = build_model(default_arch("torch")).to(device)
    opt = _sgd(model)
    assert graphed.applies(model, opt, x, distributed=False)
    assert not graphed.applies(model, opt, x, distributed=True)  # DDP's hooks reduce across ranks
    assert not graphed.applies(model, _sgd(model, fused=False), x, distributed=False)  # reads lr on the host
    assert not graphed.applies(model, torch.optim.Adam(model.parameters()), x, distributed=False)
    handle = model.features[1].register_forward_hook(lambda *args: None)  # would run once, at capture
    assert not graphed.applies(model, opt, x, distributed=False)
    handle.remove()
    handle = opt.register_step_post_hook(lambda *args: None)
    assert not graphed.applies(model, opt, x, distributed=False)
    handle.remove()
    handle = model.classifier.weight.register_post_accumulate_grad_hook(lambda p: None)
    assert not graphed.applies(model, opt, x, distributed=False)
    handle.remove()
    with torch.autocast("cuda"):
        assert not graphed.applies(model, opt, x, distributed=False)
    assert graphed.applies(model, opt, x, distributed=False)
    model.features[1].momentum = None  # the cumulative average reads the batch count on the host
    assert not graphed.applies(model, opt, x, distributed=False)


@cuda
def test_graph_replays_give_the_eager_loop_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cuda")
    make_deterministic(device)
    eager_state, eager_metrics, eager_momentum = _run(device, cuda_graph=False)
    captures, replays = [], []
    capture, call = graphed.GraphedStep._capture, graphed.GraphedStep.__call__
    monkeypatch.setattr(graphed.GraphedStep, "_capture", lambda self: (captures.append(1), capture(self))[1])
    monkeypatch.setattr(graphed.GraphedStep, "__call__",
                        lambda self, idx: (replays.append(self.eager_steps >= graphed.WARMUP), call(self, idx))[1])
    state, metrics, momentum = _run(device, cuda_graph=True)
    assert len(captures) == 2 and sum(replays) == 2 * (9 - graphed.WARMUP)  # one capture per epoch
    assert metrics == eager_metrics
    for key in eager_state:
        assert torch.equal(state[key], eager_state[key]), key  # weights, running statistics, batch counts
    for key in eager_momentum:
        assert torch.equal(momentum[key], eager_momentum[key]), key


@cuda
@pytest.mark.parametrize("momentum, then", [(0.9, 0.5), (0.0, 0.9)])  # (0, 0.9): the buffers appear mid-epoch
def test_a_changed_momentum_is_captured_again(momentum: float, then: float, monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cuda")
    make_deterministic(device)
    eager_state, eager_metrics, eager_momentum = _run(device, False, epochs=1, momentum=momentum, momentum_at=5,
                                                      then=then)
    captures = []
    capture = graphed.GraphedStep._capture
    monkeypatch.setattr(graphed.GraphedStep, "_capture", lambda self: (captures.append(1), capture(self))[1])
    state, metrics, momentum_buffers = _run(device, True, epochs=1, momentum=momentum, momentum_at=5, then=then)
    assert len(captures) == 2  # after the warm-up; after one eager step with the new momentum
    assert metrics == eager_metrics
    for key in eager_state:
        assert torch.equal(state[key], eager_state[key]), key
    for key in eager_momentum:
        assert torch.equal(momentum_buffers[key], eager_momentum[key]), key
