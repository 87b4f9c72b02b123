"""The tutorial's conv net with BatchNorm, rebuilt from a small dict of architecture arguments."""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch
from torch import nn

from bnpipe.train import conv_bn
from bnpipe.train.batchnorm import ScratchBatchNorm2d
from bnpipe.train.config import BN_CHOICES
from bnpipe.train.maxpool import MaxPool2x2

ARCH_NAME = "bn_convnet"


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "torch":
        return nn.BatchNorm2d(channels)
    if kind == "scratch":
        return ScratchBatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()  # keeps layer indices, hence state_dict keys, the same for every kind
    raise ValueError(f"unknown bn kind {kind!r}; expected one of {BN_CHOICES}")


class BNConvNet(nn.Module):
    """Conv(1,6,3,pad 1), BN, ReLU, MaxPool 2, Conv(6,16,5), BN, ReLU, MaxPool 2, Linear(400,10).

    Shapes: [N,1,28,28] -> [N,6,28,28] -> pool [N,6,14,14] -> [N,16,10,10] -> pool [N,16,5,5]
    -> flatten [N,400] -> [N,10]. With BN the convs have no bias: BN's shift makes it redundant.
    Each pool runs before its ReLU: max and ReLU commute (values and gradients), and ReLU then
    touches 4x fewer elements. Neither has parameters, so the state_dict keys are unchanged. The
    pools are ``nn.MaxPool2d(2)`` with a faster CPU path (`bnpipe.train.maxpool`). In a training step
    on the CPU the first conv and its BN run as one (`bnpipe.train.conv_bn`): the same function.
    """

    def __init__(self, bn: str = "torch", in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        conv_bias = bn == "none"
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 3, padding=1, bias=conv_bias), _norm(bn, 6), MaxPool2x2(), nn.ReLU(),
            nn.Conv2d(6, 16, 5, bias=conv_bias), _norm(bn, 16), MaxPool2x2(), nn.ReLU(),
        )
        self.classifier = nn.Linear(16 * 5 * 5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images [N, 1, 28, 28] -> logits [N, num_classes]."""
        conv, bn = self.features[0], self.features[1]
        if conv_bn.applies(conv, bn, x, self.features):
            x = conv_bn.conv_bn_train(x, conv, bn)
            for layer in islice(self.features, 2, None):
                x = layer(x)
        else:
            x = self.features(x)
        return self.classifier(x.flatten(1))


def default_arch(bn: str = "torch") -> dict[str, Any]:
    """Architecture arguments as stored in a checkpoint."""
    return {"name": ARCH_NAME, "bn": bn, "in_channels": 1, "num_classes": 10, "image_size": 28}


def build_model(arch: dict[str, Any]) -> BNConvNet:
    """Rebuild the net from the architecture arguments stored in a checkpoint.

    Raises:
        ValueError: If ``arch`` names another architecture or an unknown BN kind.
    """
    if arch.get("name") != ARCH_NAME:
        raise ValueError(f"architecture {arch.get('name')!r} is not {ARCH_NAME!r}")
    if arch.get("image_size") != 28:  # the classifier expects 16 x 5 x 5 features, from 28 x 28 inputs
        raise ValueError(f"image_size {arch.get('image_size')!r} is not 28, the only size this net takes")
    if arch.get("bn") not in BN_CHOICES:
        raise ValueError(f"unknown bn kind {arch.get('bn')!r}; expected one of {BN_CHOICES}")
    return BNConvNet(bn=arch["bn"], in_channels=int(arch["in_channels"]), num_classes=int(arch["num_classes"]))
