"""Tests for bnpipe.export.fold: the float64 fold arithmetic, on every layer/BN pattern."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnpipe.export.fold import fold_batchnorms
from bnpipe.export.fold_params import fold_bn_params
from tests.fold_helpers import EPS, LAYERS, assert_matches_reference, bn_names, make_pair, randomize_bn, seeded  # noqa: F401

def test_fold_bn_params_by_hand() -> None:
    # scale = gamma / sqrt(var + eps) = 4 / sqrt(3 + 1) = 2; w' = 2 * 2; b' = (1 - 3) * 2 + 0.5.
    w, b = fold_bn_params(torch.tensor([[[2.0]]]), torch.tensor([1.0]), torch.tensor([3.0]),
                          torch.tensor([3.0]), 1.0, torch.tensor([4.0]), torch.tensor([0.5]))  # fmt: skip
    assert w.tolist() == [[[4.0]]] and b.tolist() == [-3.5]
    # No bias and affine=False: scale = 1 / sqrt(4) = 0.5; w' = 1; b' = (0 - 3) * 0.5. dtype kept.
    w, b = fold_bn_params(torch.tensor([[2.0]], dtype=torch.float16), None, torch.tensor([3.0]),
                          torch.tensor([3.0]), 1.0, None, None)  # fmt: skip
    assert w.tolist() == [[1.0]] and b.tolist() == [-1.5]
    assert w.dtype == b.dtype == torch.float16


def test_fold_bn_params_transposed_groups_by_hand_and_channel_check() -> None:
    # ConvTranspose 4 -> 4 channels, groups=2: weight [4 in, 2 out-per-group, 1]. Input channel i is in
    # group i // 2, whose output channels are 2 * (i // 2) + j; scale = gamma = [1, 2, 3, 4].
    w, b = fold_bn_params(torch.ones(4, 2, 1), None, torch.zeros(4), torch.ones(4), 0.0,
                          torch.tensor([1.0, 2.0, 3.0, 4.0]), None, transposed=True, groups=2)  # fmt: skip
    assert w[:, :, 0].tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]
    assert b.tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="3 channels but the layer outputs 4"):
        fold_bn_params(torch.ones(4, 2), None, torch.zeros(3), torch.ones(3), 1e-5, None, None)


@pytest.mark.parametrize("eps", EPS.values(), ids=EPS.keys())
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("layer_spec", LAYERS, ids=lambda s: f"d{s[0]}{'T' if s[1] else ''}g{s[2]}")
def test_folded_pair_matches_unfolded(
    layer_spec: tuple[int, bool, int], bias: bool, affine: bool, eps: float
) -> None:
    pair, x = make_pair(layer_spec, bias, affine, eps)
    result = fold_batchnorms(pair, example_inputs=(x,))
    assert result.folded == [("0", "1")] and result.left == []
    assert bn_names(result.module) == [] and not result.module.training
    assert_matches_reference(result.module(x), pair, x)
    dims, transposed, groups = layer_spec
    # Where torch's fusion supports the case, its float64 fold is the exact answer: ours must be it,
    # rounded once to float32 (within 2^-24 relative).
    if (dims == 0 and not affine) or (transposed and groups > 1):
        return
    pair64 = copy.deepcopy(pair).double()
    exact = fuse_linear_bn_eval(*pair64) if dims == 0 else fuse_conv_bn_eval(*pair64, transpose=transposed)
    ours = result.module.get_submodule("0")
    torch.testing.assert_close(ours.weight.double(), exact.weight, rtol=6e-8, atol=0)
    torch.testing.assert_close(ours.bias.double(), exact.bias, rtol=6e-8, atol=0)


@pytest.mark.parametrize("in_channels, groups", [(4, 2), (6, 6)], ids=["raises", "wrong-shape"])
def test_grouped_conv_transpose_fusion_wrong_ours_right(in_channels: int, groups: int) -> None:
    conv = nn.ConvTranspose2d(in_channels, 6, 3, groups=groups)
    pair = nn.Sequential(conv, randomize_bn(nn.BatchNorm2d(6))).eval()
    x = torch.randn(2, in_channels, 5, 5)
    assert_matches_reference(fold_batchnorms(pair, example_inputs=(x,)).module(x), pair, x)
    # torch scales weight axis 1 as if it held all output channels; it holds out/groups of them.
    if groups == 2:  # [4, 3, 3, 3] * [1, 6, 1, 1] cannot broadcast
        with pytest.raises(RuntimeError):
            fuse_conv_bn_eval(pair[0], pair[1], transpose=True)
    else:  # depthwise: [6, 1, 3, 3] * [1, 6, 1, 1] broadcasts to a [6, 6, 3, 3] weight that cannot run
        fused = fuse_conv_bn_eval(pair[0], pair[1], transpose=True)
        assert fused.weight.shape == (6, 6, 3, 3) != conv.weight.shape
        with pytest.raises(RuntimeError, match="expected bias"):
            fused(x)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_two_batchnorms_in_a_row_fold_into_one_layer_rounded_once(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "conv":
        model, example = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.BatchNorm2d(6)), torch.randn(2, 3, 8, 8)
    else:
        model, example = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.BatchNorm1d(6)), torch.randn(2, 5)
    randomize_bn(model[1], seed=1)
    randomize_bn(model[2], eps=1e-5, seed=2)
    model.eval()
    result = fold_batchnorms(model, example_inputs=[example])
    assert result.folded == [("0", "1"), ("0", "2")] and result.left == []
    # By hand, in float64: each BN is (x - mean) * gamma / sqrt(var + eps) + beta per output channel.
    w, b = model[0].weight.detach().double(), model[0].bias.detach().double()
    for bn in (model[1], model[2]):
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * scale.reshape(-1, *[1] * (w.dim() - 1))
        b = (b - bn.running_mean.double()) * scale + bn.bias.detach().double()
    layer = result.module.get_submodule("0")
    assert torch.equal(layer.weight.detach(), w.float()) and torch.equal(layer.bias.detach(), b.float())
    with torch.no_grad():
        assert_matches_reference(result.module(example), model, example)
