"""Tests for bnpipe.export.fold: the float64 fold arithmetic and the fx graph rewrite."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnpipe.errors import BnpipeError
from bnpipe.export.fold import fold_batchnorms, fold_bn_params

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
def _seed() -> None:
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


class Net(nn.Module):
    """A non-Sequential net in eval mode: a residual block, a ConvTranspose and a Linear head, with BNs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.conv = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.up = nn.ConvTranspose2d(6, 6, 2, stride=2, groups=3)
        self.up_bn = nn.BatchNorm2d(6, affine=False)
        self.fc = nn.Linear(6, 6)
        self.fc_bn = nn.BatchNorm1d(6)
        for i, bn in enumerate(m for m in self.modules() if isinstance(m, _BatchNorm)):
            randomize_bn(bn, seed=i)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        h = torch.relu(self.bn(self.conv(h)) + h)  # residual: h is used twice, conv's output once
        h = self.up_bn(self.up(h))
        return self.fc_bn(self.fc(h.mean(dim=(2, 3))))


def test_custom_forward_folded_via_fx() -> None:
    net, x = Net(), torch.randn(2, 3, 6, 6)
    result = fold_batchnorms(net, strict=True, example_inputs=(x,))
    assert result.folded == [("features.0", "features.1"), ("conv", "bn"), ("up", "up_bn"), ("fc", "fc_bn")]
    assert bn_names(result.module) == [] and result.left == []
    assert_matches_reference(result.module(x), net, x)


def test_input_module_not_mutated_and_result_in_eval_mode() -> None:
    net = Net().train()
    for bn in (m for m in net.modules() if isinstance(m, _BatchNorm)):
        bn.eval()  # only the BNs must be in eval mode for folding; the rest may be training
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = fold_batchnorms(net, example_inputs=(torch.randn(2, 3, 6, 6),))
    assert not any(m.training for m in result.module.modules())
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert bn_names(net) == ["features.1", "bn", "up_bn", "fc_bn"] and net.training and net.conv.training
    assert net.features[0].bias is None  # the fold gives the copy a bias, not the original


def test_folded_module_exports_to_onnx_without_batchnorm() -> None:
    net, x = Net(), torch.randn(2, 3, 6, 6)
    program = torch.onnx.export(fold_batchnorms(net, example_inputs=(x,)).module, (x,), dynamo=True, verbose=False)
    proto = program.model_proto
    assert "BatchNormalization" not in {node.op_type for node in proto.graph.node}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_matches_reference(torch.from_numpy(out), net, x)


class Branchy(nn.Module):
    """A BN ``norm`` that cannot be folded (or, "bn-shared", can be at one of its two calls)."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.conv = nn.Conv2d(3, 6, 1)
        self.act = nn.ReLU()
        self.norm = randomize_bn(nn.BatchNorm2d(6))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.case == "after-relu":
            return self.norm(self.act(y))
        if self.case == "output-reused":
            return self.norm(y) + y
        if self.case == "weight-read":
            return self.norm(y) + self.conv.weight.sum()
        if self.case == "layer-reused":
            return self.norm(y) + self.conv(x * 2)
        return self.norm(y) + self.norm(torch.relu(x).repeat(1, 2, 1, 1))  # "bn-shared"


# case -> (model factory, input shape, expected folded pairs)
UNFOLDABLE = {
    **{case: (lambda case=case: Branchy(case), (2, 3, 4, 4), [])
       for case in ("after-relu", "output-reused", "weight-read", "layer-reused")},
    "bn-shared": (lambda: Branchy("bn-shared"), (2, 3, 4, 4), [("conv", "norm")]),  # the BN module stays
    # Linear [N, 6, 5] -> [N, 6, 3], then BatchNorm1d over axis 1 (6 positions), not Linear's features.
    "linear-over-sequence": (
        lambda: nn.Sequential(OrderedDict(fc=nn.Linear(5, 3), norm=randomize_bn(nn.BatchNorm1d(6)))),
        (2, 6, 5), [],
    ),
    # Same, but Linear's features equal BN's channels (6 == 6): only the shapes show it is wrong.
    "linear-over-sequence-same-size": (
        lambda: nn.Sequential(OrderedDict(fc=nn.Linear(6, 6), norm=randomize_bn(nn.BatchNorm1d(6)))),
        (2, 6, 6), [],
    ),
    # Linear [N, 6, 5, 4] -> [N, 6, 5, 6], then BatchNorm2d over axis 1.
    "linear-into-bn2d": (
        lambda: nn.Sequential(OrderedDict(fc=nn.Linear(4, 6), norm=randomize_bn(nn.BatchNorm2d(6)))),
        (2, 6, 5, 4), [],
    ),
}  # fmt: skip


def test_linear_without_example_inputs_is_left_with_the_reason() -> None:
    model = nn.Sequential(OrderedDict(fc=nn.Linear(5, 6), norm=randomize_bn(nn.BatchNorm1d(6)))).eval()
    result = fold_batchnorms(model)
    assert result.left == ["norm"] and "example_inputs" in result.reasons["norm"]


@pytest.mark.parametrize("case", UNFOLDABLE)
def test_unfoldable_bn_left_and_reported(case: str) -> None:
    make_model, shape, folded = UNFOLDABLE[case]
    model, x = make_model().eval(), torch.randn(shape)
    result = fold_batchnorms(model, example_inputs=(x,))
    assert result.folded == folded and result.left == ["norm"] and result.reasons["norm"]
    assert bn_names(result.module) == ["norm"]
    assert_matches_reference(result.module(x), model, x)
    with pytest.raises(BnpipeError, match=r"^norm: BatchNorm cannot be folded"):
        fold_batchnorms(model, strict=True, example_inputs=(x,))


def _fill(buffer: str, value: float) -> Callable[[Net], None]:
    return lambda net: getattr(net.features[1], buffer).__setitem__(0, value)


REFUSALS = {
    "training": (lambda net: net.features[1].train(), "training mode"),
    "no-running-stats": (  # built without them: the buffers are None
        lambda net: net.features.__setitem__(1, nn.BatchNorm2d(6, track_running_stats=False).eval()),
        "no running statistics",
    ),
    "stats-flag-off": (lambda net: setattr(net.features[1], "track_running_stats", False), "no running"),
    "running-mean-none": (lambda net: setattr(net.features[1], "running_mean", None), "no running"),
    "running-var-none": (lambda net: setattr(net.features[1], "running_var", None), "no running"),
    "var-nan": (_fill("running_var", float("nan")), "running_var has non-finite"),
    "var-inf": (_fill("running_var", float("inf")), "running_var has non-finite"),
    "var-negative": (_fill("running_var", -1e-3), "running_var has negative"),
    "mean-nan": (_fill("running_mean", float("nan")), "running_mean has non-finite"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusal_names_the_module(case: str) -> None:
    breaker, what = REFUSALS[case]
    net = Net()
    breaker(net)
    with pytest.raises(BnpipeError) as info:
        fold_batchnorms(net)
    message = str(info.value)
    assert message.startswith("features.1: ") and what in message and "\n" not in message


def test_untraceable_model_is_refused() -> None:
    class Dynamic(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x if x.sum() > 0 else -x  # data-dependent control flow: fx cannot trace it

    with pytest.raises(BnpipeError, match=r"^Dynamic: cannot be traced by torch.fx"):
        fold_batchnorms(Dynamic())
