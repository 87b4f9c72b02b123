"""Tests for bnpipe.export.fold on whole models: the fx rewrite, what is left in place, refusals."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnpipe.errors import BnpipeError
from bnpipe.export.fold import fold_batchnorms
from tests.fold_helpers import assert_matches_reference, bn_names, randomize_bn, seeded  # noqa: F401

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
