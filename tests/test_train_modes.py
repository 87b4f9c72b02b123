"""Train/eval modes and the schedule, tested directly: evaluation must not touch BN statistics,
training must train in train mode, and the recorded learning rate must follow the schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bnpipe.train.checkpoint import load_checkpoint, model_from_checkpoint
from bnpipe.train.config import TrainConfig
from bnpipe.train.data import load_mnist
from bnpipe.train.distributed import epoch_order
from bnpipe.train.loop import evaluate, train, train_one_epoch
from bnpipe.train.recipe import make_scheduler
from bnpipe.train.model import build_model, default_arch
from bnpipe.train.preprocess import Normalization


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def test_evaluate_leaves_every_bn_buffer_unchanged(tiny_mnist: Path) -> None:
    x, y = load_mnist(tiny_mnist, train=False)
    model = build_model(default_arch()).train()  # left in train mode, as after an epoch
    before = _buffers(model)
    evaluate(model, x, y, Normalization.from_mode("half", x))
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())


def test_recorded_test_accuracy_is_a_fresh_eval_of_the_checkpoint(trained_checkpoint: Path, tiny_mnist: Path) -> None:
    ckpt = load_checkpoint(trained_checkpoint)
    x, y = load_mnist(tiny_mnist, train=False)
    model = model_from_checkpoint(ckpt).eval()
    with torch.no_grad():  # an eval of our own, not `evaluate`, which wrote the recorded figures
        logits = model(Normalization.from_dict(ckpt["preprocessing"]).apply(x)).double()
    assert (logits.argmax(1) == y).double().mean().item() == ckpt["metrics"][-1]["test_acc"]
    # `evaluate` sums each batch of 256 losses in float32 (relative error up to ~256 * 6e-8)
    assert F.cross_entropy(logits, y).item() == pytest.approx(ckpt["metrics"][-1]["test_loss"], rel=2e-5)


def test_train_one_epoch_trains_in_train_mode_from_a_model_left_in_eval(tiny_mnist: Path) -> None:
    x, y = load_mnist(tiny_mnist, train=True)
    model = build_model(default_arch()).eval()
    modes: list[bool] = []
    # On the second BN: a hook on the first would keep it from its fused CPU path (bnpipe.train.conv_bn).
    model.features[5].register_forward_pre_hook(lambda m, inputs: modes.append(m.training))
    before = _buffers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train_one_epoch(model, Normalization.from_mode("half", x).apply(x), y, opt, make_scheduler(opt, "none", 10), 64,
                    epoch_order(x.shape[0], 0, 1))
    assert modes and all(modes)
    assert not torch.equal(model.features[1].running_mean, before["features.1.running_mean"]), "BN statistics move"
    assert model.features[1].num_batches_tracked.item() == math.ceil(x.shape[0] / 64)


def _lr_after(schedule: str, peak: float, t: int, total: int) -> float:
    """The rate after ``t`` of ``total`` steps, from the schedules' formulas (not from `make_scheduler`)."""
    if schedule == "none":
        return peak
    if schedule == "cosine":
        return peak / 2 * (1 + math.cos(math.pi * t / total))
    # One-cycle (OneCycleLR's defaults: start at peak/25, end at peak/25/1e4, cosine both ways), warm-up
    # over the first 20% of the steps; the phases meet at step 0.2 * total - 1 and end at step total - 1.
    start, low, top = peak / 25, peak / 25 / 1e4, 0.2 * total - 1
    if t <= top:
        return peak + (start - peak) / 2 * (1 + math.cos(math.pi * t / top))
    return low + (peak - low) / 2 * (1 + math.cos(math.pi * (t - top) / (total - 1 - top)))


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "none"])
def test_recorded_lr_follows_the_schedule(tiny_mnist: Path, tmp_path: Path, schedule: str) -> None:
    epochs, batch, n = 3, 32, 160
    metrics = train(TrainConfig(data=str(tiny_mnist), epochs=epochs, batch_size=batch, limit_train=n, lr=0.1,
                                schedule=schedule, device="cpu", out=str(tmp_path / "m.pt")), log=lambda line: None)
    steps = n // batch
    total = epochs * steps
    expected = [_lr_after(schedule, 0.1, (e + 1) * steps, total) for e in range(epochs)]
    assert [m["lr"] for m in metrics] == pytest.approx(expected, rel=1e-9)
    if schedule == "none":
        assert metrics[-1]["lr"] == 0.1
    else:
        assert metrics[-1]["lr"] < 0.02 * 0.1 < metrics[0]["lr"], "decays to near 0 (2% of the peak) by the end"
