"""The PyTorch-side fold on models it was not first written for: keyword calls, unbatched convs, BNs
without running statistics (issue 8's three bugs)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from bnpipe.errors import BnpipeError
from bnpipe.export.fold import fold_batchnorms
from tests.fold_helpers import assert_matches_reference, bn_names, randomize_bn, seeded  # noqa: F401


class KeywordBN(nn.Module):
    """``self.bn(input=...)``: the BatchNorm's input is in the call's kwargs, not its args."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), randomize_bn(nn.BatchNorm2d(6))

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(input=self.conv(x))


def test_bn_called_with_keyword_is_folded() -> None:
    model, x = KeywordBN().eval(), torch.randn(2, 3, 6, 6)
    result = fold_batchnorms(model, strict=True, example_inputs=(x,))
    assert result.folded == [("conv", "bn")] and bn_names(result.module) == []
    assert_matches_reference(result.module(x), model, x)


# name -> (conv, BN, unbatched input): the BN accepts the conv's output but normalizes another axis.
UNBATCHED: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple[int, ...]]] = {
    # Conv1d on [3, 8] gives [6, 6]; BatchNorm1d(6) takes it as [N=6, C=6] and normalizes the length axis.
    "conv1d": (lambda: nn.Conv1d(3, 6, 3), lambda: nn.BatchNorm1d(6), (3, 8)),
    # Conv3d on [C, D, H, W] gives 4-D, which BatchNorm2d takes as [N=6, C=D, H, W].
    "conv3d": (lambda: nn.Conv3d(3, 6, 1), lambda: nn.BatchNorm2d(6), (3, 6, 4, 4)),
}


@pytest.mark.parametrize("case", UNBATCHED)
def test_unbatched_conv_is_left_with_the_reason(case: str) -> None:
    make_conv, make_bn, shape = UNBATCHED[case]
    model, x = nn.Sequential(make_conv(), randomize_bn(make_bn())).eval(), torch.randn(shape)
    result = fold_batchnorms(model, example_inputs=(x,))
    assert result.folded == [] and result.left == ["1"]
    assert "unbatched" in result.reasons["1"] or "does not follow" in result.reasons["1"]
    assert_matches_reference(result.module(x), model, x)
    with pytest.raises(BnpipeError, match=r"^1: BatchNorm cannot be folded"):
        fold_batchnorms(model, strict=True, example_inputs=(x,))


def test_conv_without_example_inputs_is_left_with_the_reason() -> None:
    model = nn.Sequential(nn.Conv1d(3, 6, 3), randomize_bn(nn.BatchNorm1d(6))).eval()
    result = fold_batchnorms(model)
    assert result.left == ["1"] and "example_inputs" in result.reasons["1"]


NO_STATS: dict[str, Callable[[nn.Sequential], None]] = {
    "built-without": lambda m: m.__setitem__(1, nn.BatchNorm2d(6, track_running_stats=False).eval()),
    "flag-off": lambda m: setattr(m[1], "track_running_stats", False),
    "buffers-none": lambda m: (setattr(m[1], "running_mean", None), setattr(m[1], "running_var", None)),
}


@pytest.mark.parametrize("case", NO_STATS)
def test_bn_without_running_stats_is_left_not_refused(case: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), randomize_bn(nn.BatchNorm2d(6)), nn.ReLU(),
                          nn.Conv2d(6, 6, 1), randomize_bn(nn.BatchNorm2d(6), seed=1)).eval()
    NO_STATS[case](model)
    x = torch.randn(2, 3, 6, 6)
    result = fold_batchnorms(model, example_inputs=(x,))
    assert result.folded == [("3", "4")] and result.left == ["1"]  # the rest of the model still folds
    assert "no running statistics" in result.reasons["1"]
    torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(BnpipeError, match=r"^1: BatchNorm cannot be folded: it has no running statistics"):
        fold_batchnorms(model, strict=True, example_inputs=(x,))
