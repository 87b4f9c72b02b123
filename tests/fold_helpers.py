"""Shared pieces of the folding tests: BatchNorms with edge-case statistics, the float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


# Every BatchNorm in these tests has 6 channels mixing the edge cases: running_var ordinary or near
# zero, gamma ordinary, large (1e3) or tiny (1e-4). Outputs are checked per channel, so a wrong tiny-
# gamma channel is not hidden by a large one. EPS holds eps values to cross with them: a non-default
# one (folding with torch's default 1e-5 instead of the BN's own eps then shows up), and a tiny one.
VAR_NEAR_ZERO = torch.tensor([False, True, False, True, False, True])
GAMMA_SCALE = torch.tensor([1.0, 1.0, 1e3, 1e3, 1e-4, 1e-4])
EPS = {"eps=1e-5": 1e-5, "eps=1e-3": 1e-3, "eps=1e-12": 1e-12}
# (dims, transposed, groups); dims 0 is Linear + BatchNorm1d.
LAYERS = [(d, t, g) for d in (1, 2, 3) for t in (False, True) for g in (1, 2)] + [(0, False, 1)]


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Seed torch's global generator (layer init, inputs) so that every test is reproducible alone."""
    torch.manual_seed(0)


def randomize_bn(bn: _BatchNorm, eps: float = 1e-3, seed: int = 0) -> _BatchNorm:
    """Give a 6-channel ``bn`` the edge-case running statistics above and random affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    bn.eps = eps
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(6, generator=gen) * 4 - 2)
        var = torch.rand(6, generator=gen)
        bn.running_var.copy_(torch.where(VAR_NEAR_ZERO, var * 1e-8, var * 1.5 + 0.5))
        if bn.affine:
            bn.weight.copy_((torch.rand(6, generator=gen) + 0.5) * GAMMA_SCALE)
            bn.bias.copy_(torch.rand(6, generator=gen) * 2 - 1)
    return bn


def make_pair(
    layer_spec: tuple[int, bool, int], bias: bool, affine: bool, eps: float
) -> tuple[nn.Module, Tensor]:
    """An eval-mode ``layer -> BN`` Sequential and an input for it."""
    dims, transposed, groups = layer_spec
    if dims == 0:
        layer, bn, x = nn.Linear(5, 6, bias=bias), nn.BatchNorm1d(6, affine=affine), torch.randn(7, 5)
    else:
        # 4 in / 6 out channels: with groups=2 that is 2 -> 3 per group, so group offsets matter.
        layer_type = getattr(nn, f"{'ConvTranspose' if transposed else 'Conv'}{dims}d")
        layer = layer_type(4, 6, 3, groups=groups, bias=bias)
        bn, x = getattr(nn, f"BatchNorm{dims}d")(6, affine=affine), torch.randn(2, 4, *[5] * dims)
    return nn.Sequential(layer, randomize_bn(bn, eps)).eval(), x


def assert_matches_reference(out: Tensor, original: nn.Module, x: Tensor) -> None:
    """``out``, a float32 output for ``x``, equals the unfolded ``original`` run in float64."""
    with torch.no_grad():
        reference = copy.deepcopy(original).double()(x.double())
    out = out.detach().double()
    assert out.shape == reference.shape
    # Per output channel (dim 1), relative to that channel's largest value (float32 rounding is ~1e-7
    # of it), so a tiny-gamma channel is checked on its own scale. The +1 is for channels whose values
    # all sit near zero: they are sums of O(1) terms (inputs, beta), rounded to ~1e-7 absolute.
    other_dims = [d for d in range(reference.dim()) if d != 1]
    scale = reference.abs().amax(dim=other_dims, keepdim=True) + 1.0
    worst = ((out - reference).abs() / scale).max().item()
    assert worst < 2e-6, f"error {worst:.2e} of the channel's magnitude"


def bn_names(module: nn.Module) -> list[str]:
    """Qualified names of the BatchNorm modules in ``module``."""
    return [name for name, m in module.named_modules() if isinstance(m, _BatchNorm)]
