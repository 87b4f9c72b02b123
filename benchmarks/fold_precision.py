"""Precision target: our float64 BatchNorm fold is at least as exact as torch.nn.utils.fusion.

For each case a random ``layer -> BatchNorm`` pair is folded twice into float32, by
``bnpipe.export.fold.fold_batchnorms`` and by ``torch.nn.utils.fusion``, on the same modules. Two
errors are printed for each:

- f32: max abs error of the folded float32 layer run in float32, against the unfolded pair run in
  float64. Float32 inference rounding is the same whichever fold made the weights and dominates a
  single case, so one case's ratio scatters around 1 (seen: 0.5 to 1.35); gated is the geometric
  mean of the ratios over all cases, which must be <= 1.
- bound: the largest output error the folded parameters' rounding can cause on the same input,
  ``max(sum |x| |W - W_exact| + |b - b_exact|)``, exact fold from torch's fusion in float64. Gated: the
  worst ratio ours/torch must be <= 1.

Run: ``.venv/bin/python benchmarks/fold_precision.py`` (exits 1 on FAIL).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnpipe.export.fold import fold_batchnorms

# name -> (layer factory, BatchNorm factory, input shape); torch's fusion handles these (groups=1
# for ConvTranspose: it gets grouped ConvTranspose wrong).
PATTERNS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], nn.Module], tuple[int, ...]]] = {
    "conv1d": (lambda: nn.Conv1d(8, 16, 5), nn.BatchNorm1d, (64, 8, 40)),
    "conv2d": (lambda: nn.Conv2d(8, 16, 3, bias=False), nn.BatchNorm2d, (32, 8, 12, 12)),
    "conv2d_g4": (lambda: nn.Conv2d(8, 16, 3, groups=4), nn.BatchNorm2d, (32, 8, 12, 12)),
    "conv3d": (lambda: nn.Conv3d(4, 8, 3), nn.BatchNorm3d, (4, 4, 8, 8, 8)),
    "convT2d": (lambda: nn.ConvTranspose2d(8, 16, 3), nn.BatchNorm2d, (16, 8, 10, 10)),
    "linear": (lambda: nn.Linear(32, 16), nn.BatchNorm1d, (512, 32)),
}

# name -> (running_var range, eps, gamma range): ordinary statistics and the edge cases.
STATS: dict[str, tuple[tuple[float, float], float, tuple[float, float]]] = {
    "plain": ((0.5, 2.0), 1e-5, (0.5, 2.0)),
    "var~0": ((0.0, 1e-8), 1e-5, (0.5, 2.0)),
    "var~0,eps~0": ((1e-9, 1e-8), 1e-12, (0.5, 2.0)),
    "gamma=1e3": ((0.5, 2.0), 1e-5, (1e3, 2e3)),
    "gamma=1e-4": ((0.5, 2.0), 1e-5, (1e-4, 2e-4)),
    "var~0,gamma=1e3": ((0.0, 1e-8), 1e-5, (1e3, 2e3)),
}


def make_pair(pattern: str, stats: str, seed: int) -> tuple[nn.Sequential, Tensor]:
    """Build a random eval-mode ``layer -> BN`` pair and an input batch for it."""
    make_layer, make_bn, shape = PATTERNS[pattern]
    (var_lo, var_hi), eps, (g_lo, g_hi) = STATS[stats]
    torch.manual_seed(seed)
    layer = make_layer()
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn = make_bn(out_channels)
    bn.eps = eps
    with torch.no_grad():
        bn.running_mean.uniform_(-2.0, 2.0)
        bn.running_var.uniform_(var_lo, var_hi)
        bn.weight.uniform_(g_lo, g_hi)
        bn.bias.uniform_(-1.0, 1.0)
    return nn.Sequential(layer, bn).eval(), torch.randn(shape)


def torch_fused(pair: nn.Sequential) -> nn.Module:
    """Fold with torch.nn.utils.fusion: the baseline in float32, the exact fold in float64."""
    layer, bn = pair[0], pair[1]
    if isinstance(layer, nn.Linear):
        return fuse_linear_bn_eval(layer, bn)
    return fuse_conv_bn_eval(layer, bn, transpose=isinstance(layer, nn.ConvTranspose2d))


def inference_error(layer: nn.Module, x: Tensor, reference: Tensor) -> float:
    """Max abs difference between the float32 layer's output and the float64 reference."""
    with torch.no_grad():
        return (layer(x).double() - reference).abs().max().item()


def fold_error_bound(layer: nn.Module, exact: nn.Module, x: Tensor) -> float:
    """Largest output error that the rounding of the folded parameters can cause on ``x``.

    Runs the layer in float64 with weight ``|W - W_exact|`` and bias ``|b - b_exact|`` on ``|x|``:
    each output is then ``sum |x| |dW| + |db|``, which grows with every parameter's error, so a
    fold whose parameters are each at least as close to the exact fold gets a bound no larger.
    """
    bound = copy.deepcopy(layer).double()
    with torch.no_grad():
        bound.weight.copy_((layer.weight.double() - exact.weight).abs())
        bound.bias.copy_((layer.bias.double() - exact.bias).abs())
        return bound(x.double().abs()).max().item()


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs, with 0/0 counted as a tie."""
    return ours / theirs if theirs > 0 else (1.0 if ours == 0 else float("inf"))


# (header, format spec) for each column of the table.
COLUMNS = [("pattern", "<10"), ("stats", "<16"), ("seed", ">4"), ("f32 ours", ">11.3e"),
           ("f32 torch", ">11.3e"), ("ratio", ">7.3f"), ("bound ours", ">12.3e"),
           ("bound torch", ">12.3e"), ("ratio", ">7.3f")]  # fmt: skip


def table_row(values: tuple[object, ...], header: bool = False) -> str:
    """One table line; a header keeps only each column's alignment and width."""
    specs = [spec.split(".")[0] if header else spec for _, spec in COLUMNS]
    return "".join(f"{value:{spec}}" for value, spec in zip(values, specs, strict=True))


def main(seeds: int = 2) -> int:
    """Print the error table and the verdict; return the exit status (0 on PASS)."""
    print(table_row(tuple(name for name, _ in COLUMNS), header=True))
    worst_inference = worst_bound = 0.0
    log_ratios: list[float] = []
    for pattern in PATTERNS:
        for stats in STATS:
            for seed in range(seeds):
                pair, x = make_pair(pattern, stats, seed)
                with torch.no_grad():
                    reference = copy.deepcopy(pair).double()(x.double())
                exact = torch_fused(copy.deepcopy(pair).double())  # float64 fold: error ~1e-16
                ours, theirs = fold_batchnorms(pair, example_inputs=(x,)).module.get_submodule("0"), torch_fused(pair)
                f32 = (inference_error(ours, x, reference), inference_error(theirs, x, reference))
                bound = (fold_error_bound(ours, exact, x), fold_error_bound(theirs, exact, x))
                worst_inference = max(worst_inference, ratio(*f32))
                log_ratios.append(math.log(ratio(*f32)))
                worst_bound = max(worst_bound, ratio(*bound))
                print(table_row((pattern, stats, seed, *f32, ratio(*f32), *bound, ratio(*bound))))
    geo_mean = math.exp(sum(log_ratios) / len(log_ratios))
    print(f"f32 inference error: worst ratio ours/torch = {worst_inference:.3f} (one case, not gated)")
    inference_ok = geo_mean <= 1.0
    print(f"f32 inference error over all {len(log_ratios)} cases: geometric mean ratio ours/torch = "
          f"{geo_mean:.3f}  {'PASS' if inference_ok else 'FAIL'}")
    bound_ok = worst_bound <= 1.0
    print(f"fold error bound: worst ratio ours/torch = {worst_bound:.3f}  {'PASS' if bound_ok else 'FAIL'}")
    return 0 if inference_ok and bound_ok else 1


if __name__ == "__main__":
    sys.exit(main())
