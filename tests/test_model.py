import pytest
import torch

from bnpipe.train.model import build_model, default_arch
from bnpipe.train.preprocess import Normalization


@pytest.mark.parametrize("bn", ["torch", "scratch"])
def test_train_mode_couples_samples_eval_mode_does_not(bn: str) -> None:
    torch.manual_seed(0)
    model = build_model(default_arch(bn))
    batch = torch.randn(8, 1, 28, 28)
    other = torch.cat([batch[:1], torch.randn(7, 1, 28, 28) * 3 + 1])
    model.train()
    assert not torch.allclose(model(batch)[0], model(other)[0], atol=1e-4), "BN in training uses batch statistics"
    model.eval()
    alone = model(batch[:1])
    assert torch.equal(model(batch)[:1], alone) or torch.allclose(model(batch)[:1], alone, atol=1e-6)
    assert torch.allclose(model(other)[:1], alone, atol=1e-6)


@pytest.mark.parametrize("bn", ["torch", "scratch"])
def test_running_stats_move_towards_the_data(bn: str) -> None:
    torch.manual_seed(1)
    model = build_model(default_arch(bn)).train()
    first_bn = model.features[1]
    x = torch.randn(64, 1, 28, 28) * 2 + 5
    with torch.no_grad():
        target = model.features[0](x)  # what the first BN sees, [64, 6, 28, 28]
        for _ in range(60):
            model(x)
    assert torch.allclose(first_bn.running_mean, target.mean((0, 2, 3)), rtol=1e-2, atol=1e-2)
    assert torch.allclose(first_bn.running_var, target.var((0, 2, 3)), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bn", ["torch", "scratch", "none"])
def test_single_sample_in_eval_mode(bn: str) -> None:
    model = build_model(default_arch(bn)).eval()
    pixels = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
    logits = model(Normalization("half", (0.5,), (0.5,)).apply(pixels))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


def test_none_is_a_baseline_without_bn() -> None:
    names = {type(m).__name__ for m in build_model(default_arch("none")).modules()}
    assert not any("BatchNorm" in n for n in names)


def test_build_model_refuses_another_architecture() -> None:
    with pytest.raises(ValueError, match="resnet"):
        build_model(dict(default_arch(), name="resnet"))


def test_pool_before_relu_matches_the_tutorial_order_in_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_model(default_arch("torch"))
    f = model.features
    assert isinstance(f[2], torch.nn.MaxPool2d) and isinstance(f[3], torch.nn.ReLU)
    # ReLU, then the stock pool: an independent reference for the order and for the fast pool alike.
    tutorial = torch.nn.Sequential(f[0], f[1], f[3], torch.nn.MaxPool2d(2), f[4], f[5], f[7], torch.nn.MaxPool2d(2))
    x = torch.randn(16, 1, 28, 28)
    grads = []
    for features in (f, tutorial):
        model.zero_grad()
        out = model.classifier(features(x).flatten(1))
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
