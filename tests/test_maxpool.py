"""The CPU fast max pool against F.max_pool2d: values and gradients bit for bit, ties included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnpipe.train.maxpool import MaxPool2x2, max_pool_2x2, pool_windows, unpool_windows


def _tied(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values on a coarse grid, so that most 2x2 windows hold ties, as MNIST's flat background does."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=g).to(dtype) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 3, 8, 6), (64, 6, 28, 28), (2, 16, 10, 10)])
def test_values_and_gradients_match_max_pool2d(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _tied(shape, dtype)
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = max_pool_2x2(a), F.max_pool2d(b, 2)
    ours.backward(grad)
    ref.backward(grad)
    assert torch.equal(ours, ref)
    assert torch.equal(a.grad, b.grad)  # each window's gradient lands on max_pool2d's pick, even with ties


def test_without_grad_same_values() -> None:
    x = torch.randn(3, 2, 12, 8)
    with torch.inference_mode():
        assert torch.equal(max_pool_2x2(x), F.max_pool2d(x, 2))


def test_layer_falls_back_where_the_fast_path_does_not_apply() -> None:
    pool = MaxPool2x2()
    odd = torch.randn(2, 3, 7, 9, requires_grad=True)
    assert torch.equal(pool(odd), F.max_pool2d(odd, 2))  # floor mode drops the last row and column
    strided = torch.randn(2, 3, 8, 8).transpose(2, 3)
    assert torch.equal(pool(strided), F.max_pool2d(strided, 2))
    assert pool.kernel_size == 2 and pool.stride == 2 and isinstance(pool, torch.nn.MaxPool2d)


def test_inplace_relu_after_the_layer_as_after_max_pool2d() -> None:
    x = torch.randn(2, 3, 8, 8)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = torch.nn.ReLU(inplace=True)(MaxPool2x2()(a))
    ref = torch.nn.ReLU(inplace=True)(F.max_pool2d(b, 2))
    ours.sum().backward()
    ref.sum().backward()
    assert torch.equal(ours, ref) and torch.equal(a.grad, b.grad)


def test_gradcheck() -> None:
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)  # no ties: a smooth point
    assert torch.autograd.gradcheck(max_pool_2x2, (x,))


def test_second_derivative_is_refused_not_wrong() -> None:
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(max_pool_2x2(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def _by_window(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, 4, H/2 * W/2]: the layout of ``patch_stats.patches(windows=True)``'s conv output."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, c, 4, h * w // 4)


@pytest.mark.parametrize("shape", [(4, 3, 8, 6), (64, 6, 28, 28)])
def test_pooling_by_window_matches_max_pool2d(shape: tuple[int, ...]) -> None:
    x = _tied(shape, torch.float32)
    b = x.clone().requires_grad_()
    ref = F.max_pool2d(b, 2)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    pooled, masks = pool_windows(_by_window(x))
    assert torch.equal(pooled, ref.detach().flatten(2))
    assert torch.equal(unpool_windows(grad.flatten(2), masks), _by_window(b.grad))  # ties: max_pool2d's pick
