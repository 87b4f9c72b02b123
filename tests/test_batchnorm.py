import pytest
import torch
from torch import nn

from bnpipe.train.batchnorm import ScratchBatchNorm2d, batch_norm, moment_sums, moments_from_sums


def _run_both(torch_bn: nn.Module, shape: tuple[int, ...], steps: int, momentum: float) -> None:
    c = shape[1]
    gamma, beta = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    with torch.no_grad():
        torch_bn.weight.copy_(gamma)
        torch_bn.bias.copy_(beta)
    mean, var = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    for step in range(steps):
        x = torch.randn(shape, dtype=torch.float64) * (step + 1) + step
        torch_bn.train()
        ours = batch_norm(x, gamma, beta, mean, var, training=True, momentum=momentum, eps=torch_bn.eps)
        assert torch.allclose(ours, torch_bn(x), atol=1e-6)
        assert torch.allclose(mean, torch_bn.running_mean, atol=1e-6)
        assert torch.allclose(var, torch_bn.running_var, atol=1e-6)
    torch_bn.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert torch.allclose(batch_norm(x, gamma, beta, mean, var, False, momentum, torch_bn.eps), torch_bn(x), atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_matches_batchnorm1d(momentum: float) -> None:
    torch.manual_seed(0)
    _run_both(nn.BatchNorm1d(5, momentum=momentum, eps=1e-3).double(), (16, 5), steps=4, momentum=momentum)


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_matches_batchnorm2d(momentum: float) -> None:
    torch.manual_seed(1)
    _run_both(nn.BatchNorm2d(3, momentum=momentum).double(), (4, 3, 5, 6), steps=4, momentum=momentum)


def test_moving_var_uses_unbiased_batch_variance() -> None:
    x = torch.tensor([[0.0], [2.0]])  # biased var 1, unbiased var 2
    mean, var = torch.zeros(1), torch.zeros(1)
    batch_norm(x, None, None, mean, var, training=True, momentum=1.0)
    assert var.item() == pytest.approx(2.0) and mean.item() == pytest.approx(1.0)


def test_single_value_per_channel_in_training_is_refused() -> None:
    with pytest.raises(ValueError, match="more than 1 value"):
        batch_norm(torch.randn(1, 3), None, None, torch.zeros(3), torch.ones(3), training=True)


def _twins() -> tuple[ScratchBatchNorm2d, nn.BatchNorm2d]:
    return ScratchBatchNorm2d(4), nn.BatchNorm2d(4)


def test_module_matches_and_counts_batches() -> None:
    torch.manual_seed(2)
    ours, ref = _twins()
    for _ in range(3):
        x = torch.randn(8, 4, 3, 3) * 2 + 1
        assert torch.allclose(ours(x), ref(x), atol=1e-6)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-6)
    ours.eval(), ref.eval()
    x = torch.randn(2, 4, 3, 3)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    before = ours.running_mean.clone()
    ours(x)
    assert torch.equal(before, ours.running_mean), "eval must not update the moving statistics"


def test_cumulative_momentum_none_matches_torch() -> None:
    torch.manual_seed(3)
    ours, ref = ScratchBatchNorm2d(2, momentum=None), nn.BatchNorm2d(2, momentum=None)
    for _ in range(3):
        x = torch.randn(6, 2, 2, 2)
        ours(x), ref(x)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-6)


def test_state_dict_round_trips_both_ways() -> None:
    torch.manual_seed(4)
    ours, ref = _twins()
    ref(torch.randn(8, 4, 3, 3) * 3)  # give the reference non-default statistics
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(2, 4, 3, 3)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    ours.train()(torch.randn(8, 4, 3, 3))
    fresh = nn.BatchNorm2d(4)
    fresh.load_state_dict(ours.state_dict())
    assert torch.equal(fresh.running_mean, ours.running_mean)
    assert fresh.num_batches_tracked.item() == ours.num_batches_tracked.item() == 2


def test_moment_sums_of_parts_give_the_whole_batch_moments() -> None:
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64) * 3 + 2
    whole_mean, whole_var, n = moments_from_sums(moment_sums(x[:2]) + moment_sums(x[2:]))  # as across ranks
    assert n == 6 * 4 * 5
    assert torch.allclose(whole_mean, x.mean(dim=(0, 2, 3)), rtol=0, atol=1e-12)
    assert torch.allclose(whole_var, x.var(dim=(0, 2, 3), correction=0), rtol=0, atol=1e-12)
    mean_2d, var_2d, n_2d = moments_from_sums(moment_sums(x[:, :, 0, 0]))  # [N, C] input: one value per sample
    assert n_2d == 6 and torch.allclose(var_2d, x[:, :, 0, 0].var(dim=0, correction=0), rtol=0, atol=1e-12)
    assert torch.allclose(mean_2d, x[:, :, 0, 0].mean(dim=0), rtol=0, atol=1e-12)


def test_low_precision_batch_updates_float32_statistics_in_float32() -> None:
    """A bfloat16 batch's statistics are cast before the update, not multiplied by the momentum in bfloat16."""
    x = (torch.randn(8, 3, 4, 4) + 1.2345678).bfloat16()
    mean, var = torch.zeros(3), torch.ones(3)
    batch_norm(x, None, None, mean, var, True, momentum=0.1)
    batch_mean = x.float().mean((0, 2, 3)).bfloat16().float()  # bfloat16's own mean, then widened
    assert torch.allclose(mean, 0.1 * batch_mean, rtol=1e-6, atol=0)
