import torch

from bnpipe.train.preprocess import Normalization, center, scale_to_unit_range, standardize


def test_center_gives_zero_mean_per_feature() -> None:
    x = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]])
    out = center(x)
    assert torch.allclose(out, torch.tensor([[-2.0, -20.0], [0.0, 0.0], [2.0, 20.0]]))


def test_standardize_gives_unit_std_per_feature() -> None:
    x = torch.randn(1000, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([3.0, -2.0, 7.0])
    out = standardize(x)
    assert torch.allclose(out.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out.std(0, correction=0), torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_standardize_per_channel_on_images() -> None:
    x = torch.rand(8, 2, 4, 4) * torch.tensor([1.0, 9.0]).view(1, 2, 1, 1)
    out = standardize(x, dims=(0, 2, 3))
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(2), atol=1e-6)
    assert torch.allclose(out.std((0, 2, 3), correction=0), torch.ones(2), atol=1e-5)


def test_scale_to_unit_range_hits_both_ends() -> None:
    x = torch.tensor([[0.0, -4.0], [5.0, 0.0], [10.0, 4.0]])
    out = scale_to_unit_range(x)
    assert torch.equal(out, torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]))


def test_half_mode_is_the_tutorials_formula_and_unit_range() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    norm = Normalization.from_mode("half", pixels)
    expected = (pixels.float() / 255 - 0.5) / 0.5
    assert torch.allclose(norm.apply(pixels), expected, atol=1e-7)
    assert torch.allclose(norm.apply(pixels), scale_to_unit_range(pixels.float(), 0.0, 255.0), atol=1e-6)


def test_dataset_mode_uses_training_stats_and_round_trips() -> None:
    pixels = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    norm = Normalization.from_mode("dataset", pixels)
    out = norm.apply(pixels).double()
    assert abs(out.mean().item()) < 1e-5 and abs(out.std(correction=0).item() - 1) < 1e-5
    assert Normalization.from_dict(norm.to_dict()) == norm
