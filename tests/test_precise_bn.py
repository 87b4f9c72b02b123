"""Precise BN: population statistics of each BN's input under frozen weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnpipe.train.checkpoint import load_checkpoint
from bnpipe.train.config import TrainConfig
from bnpipe.train.loop import train
from bnpipe.train.model import BNConvNet
from bnpipe.train.precise_bn import update_bn_stats


def _population(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance per channel of [N, C, H, W] batches, all values pooled (float64)."""
    pooled = torch.cat([x.double().transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)
    return pooled.mean(1), pooled.var(1, correction=1)


@pytest.mark.parametrize("bn", ["torch", "scratch"])
def test_precise_bn_is_the_population_mean_and_unbiased_variance(bn: str) -> None:
    torch.manual_seed(0)
    net = BNConvNet(bn=bn)
    net.features[0].weight.data.mul_(3)
    # Batches whose means differ, so that the average of batch variances is NOT the population variance.
    batches = [torch.randn(n, 1, 28, 28) * s + m for n, s, m in ((16, 1.0, 0.0), (16, 2.0, 1.5), (8, 0.5, -1.0))]
    params = {k: v.clone() for k, v in net.named_parameters()}
    tracked = net.features[1].num_batches_tracked.item()
    net.eval()

    # Expected: BN1 sees conv1's output; BN2 sees conv2 of what BN1 (batch statistics, train mode) passed on.
    conv1, bn1, conv2 = net.features[0], net.features[1], net.features[4]
    with torch.no_grad():
        h1 = [conv1(x) for x in batches]
        h2 = [conv2(F.max_pool2d(F.relu(F.batch_norm(h, None, None, bn1.weight, bn1.bias, training=True)), 2))
              for h in h1]
    assert update_bn_stats(net, iter(batches)) == 3
    for layer, inputs in ((bn1, h1), (net.features[5], h2)):
        mean, var = _population(inputs)
        assert torch.allclose(layer.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
        assert torch.allclose(layer.running_var.double(), var, rtol=1e-6, atol=1e-6)
        # The equal-weight average of batch variances would be far off here.
        naive = torch.stack([h.double().var((0, 2, 3)) for h in inputs]).mean(0)
        assert not torch.allclose(layer.running_var.double(), naive, rtol=1e-2)
    assert all(torch.equal(v, params[k]) for k, v in net.named_parameters()), "weights stay frozen"
    assert net.features[1].num_batches_tracked.item() == tracked and not net.training, "mode and counters restored"


def test_no_batches_keeps_the_moving_statistics() -> None:
    net = BNConvNet()
    nn.init.uniform_(net.features[1].running_mean)
    before = net.features[1].running_mean.clone()
    assert update_bn_stats(net, iter([])) == 0
    assert torch.equal(net.features[1].running_mean, before)


def test_precise_bn_option_reports_before_and_after(tiny_mnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    lines: list[str] = []
    train(TrainConfig(data=str(tiny_mnist), epochs=2, batch_size=32, precise_bn=4, device="cpu", out=str(out)),
          log=lines.append)
    assert "precise BN (4 batches): test loss" in lines[-1] and "precise BN" not in lines[0]
    last = json.loads(out.with_suffix(".json").read_text())["metrics"][-1]
    assert last["precise_bn_batches"] == 4
    assert {"test_loss_before_precise_bn", "test_acc_before_precise_bn"} <= set(last)
    assert last["test_loss"] != last["test_loss_before_precise_bn"]
    assert load_checkpoint(out)["metrics"][-1] == last
