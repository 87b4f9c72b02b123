"""Peer table: `bnpipe fold` against onnxoptimizer, onnxsim, onnxslim and onnxruntime's offline optimizer.

Models: torchvision resnet18, mobilenet_v3_small, efficientnet_b0, regnet_x_400mf (``weights=None``), a
decoder with grouped and depthwise ConvTranspose2d + BN, and a Linear + BatchNorm1d head (Gemm). Each gets
random weights and random BN statistics (variance log-uniform over [1e-6, 5], a different eps per BN) and is
exported with ``torch.onnx.export(..., dynamo=True, optimize=False)``, so its BN nodes stay.

For each model and tool: BN nodes left, wrong output (yes/no: max |error| over 1e-3 of the output's
magnitude, or the tool or the result failing), and max |error| against PyTorch eval of the original model
in float64, two ways:

- float32 run: onnxruntime (CPU, graph optimizations off, so the graph runs as the tool wrote it). What a
  user gets; float32 inference rounding dominates it and moves either way with any change of weights.
- float64 run: the same graph with its float32 values widened exactly to float64, run by onnx's numpy
  reference runtime. Inference rounding is gone; what is left is the rounding of the folded weights.

Gate: bnpipe leaves no BN, is never wrong, and its float64-run error is at most that of the best peer
that folds every BN.

Needs the `bench` extra (see CONTRIBUTING.md: install it without the CPU onnxruntime).
Run: ``.venv/bin/python benchmarks/onnx_fold_peers.py [--models resnet18,...]`` (exits 1 on FAIL).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from torch import nn

from bnpipe.errors import one_line
from bnpipe.export.onnx_fold_file import fold_onnx_file
from bnpipe.export.onnx_verify import graph_stats
from float64_run import run64  # benchmarks/float64_run.py, beside this script

WRONG = 1e-3  # error over this fraction of the output's magnitude is a wrong output, not rounding


class Decoder(nn.Module):
    """Conv + BN, then grouped and depthwise ConvTranspose2d + BN: [N, 8, 8, 8] -> [N, 16, 32, 32]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.ConvTranspose2d(16, 32, 2, stride=2, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 2, stride=2, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def linear_head() -> nn.Module:
    """Linear + BatchNorm1d twice on [N, 64]: the exporter writes Gemm (or MatMul + Add) nodes."""
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10, bias=False),
                         nn.BatchNorm1d(10))  # fmt: skip


def with_conv_biases(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """The model with a random bias on every bias-free conv: the exporter then writes it as an initializer.

    Without one, torch's exporter (optimize=False) writes the missing bias as ``Expand(CastLike(0, x),
    Shape(W))``; the peers do not see that as a constant, so this variant shows what they do when they fold.
    """

    def make_biased() -> nn.Module:
        model = make()
        for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is None):
            conv.bias = nn.Parameter(torch.randn(conv.out_channels) * 0.1)
        return model

    return make_biased


TORCHVISION = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf")
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    **{name: (lambda name=name: getattr(torchvision.models, name)(weights=None), (2, 3, 64, 64)) for name in TORCHVISION},
    **{f"{name} + conv biases": (with_conv_biases(lambda name=name: getattr(torchvision.models, name)(weights=None)),
                                 (2, 3, 64, 64)) for name in TORCHVISION},  # fmt: skip
    "decoder (ConvTranspose)": (Decoder, (2, 8, 8, 8)),
    "linear head (Gemm)": (linear_head, (4, 64)),
}


def randomized(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """The model in eval mode with random BN statistics, affine parameters and eps.

    gamma is drawn relative to ``sqrt(var + eps)``, so each BN's scale stays O(1) whatever its variance
    and activations stay finite through a deep net, while the fold still meets variances from 1e-6 up.
    """
    torch.manual_seed(seed)
    model = make().eval()
    gen = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        c = bn.num_features
        with torch.no_grad():
            bn.running_var.copy_(10 ** (torch.rand(c, generator=gen) * (math.log10(5) + 6) - 6))  # [1e-6, 5]
            bn.running_mean.copy_(torch.randn(c, generator=gen))
            bn.eps = float(10 ** (torch.rand(1, generator=gen) * 4 - 6))  # [1e-6, 1e-2], one per BN
            bn.weight.copy_((torch.rand(c, generator=gen) + 0.5) * torch.sqrt(bn.running_var + bn.eps))
            bn.bias.copy_(torch.randn(c, generator=gen) * 0.5)
    return model


def run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def ort_offline(level: str) -> Callable[[Path, Path], None]:
    def tool(src: Path, out: Path) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
        options.optimized_model_filepath = str(out)
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])

    return tool


def _onnxoptimizer(src: Path, out: Path) -> None:
    import onnxoptimizer

    onnx.save(onnxoptimizer.optimize(onnx.load(str(src)), ["fuse_bn_into_conv"]), str(out))


def _onnxsim(src: Path, out: Path) -> None:
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(str(src)))
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    onnx.save(model, str(out))


def _onnxslim(src: Path, out: Path) -> None:
    import onnxslim

    onnx.save(onnxslim.slim(onnx.load(str(src))), str(out))


TOOLS: dict[str, Callable[[Path, Path], None]] = {
    "bnpipe fold": lambda src, out: fold_onnx_file(src, out),
    "onnxoptimizer fuse_bn_into_conv": _onnxoptimizer,
    "onnxsim": _onnxsim,
    "onnxslim": _onnxslim,
    "onnxruntime basic": ort_offline("basic"),
    "onnxruntime extended": ort_offline("extended"),
}


def measure(name: str, workdir: Path, seed: int) -> tuple[float, list[tuple[str, str, str, float, float]]]:
    """Max |output| and rows ``(tool, BN left, wrong, error float32 run, error float64 run)`` for one model."""
    make, shape = MODELS[name]
    model = randomized(make, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = model.double()(x.double()).numpy()
        model.float()
    src = workdir / "original.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(src), dynamo=True, optimize=False, verbose=False, report=False)
    scale = float(np.abs(reference).max())
    rows = []
    for tool, fold in {"(original, unfolded)": None, **TOOLS}.items():
        out = src if fold is None else workdir / f"{tool.split()[0]}-{len(rows)}.onnx"
        try:
            if fold is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fold(src, out)
            bn_left = str(graph_stats(onnx.load(str(out)))["bn_nodes"])
            err = float(np.abs(run(out, x.numpy()).astype(np.float64) - reference).max())
            wrong = "yes" if not err <= WRONG * scale else "no"
        except Exception as exc:  # noqa: BLE001 - a peer failing is a row of the table
            rows.append((tool, "-", f"yes: {one_line(exc, 110)}", math.nan, math.nan))
            continue
        try:
            err64 = float(np.abs(run64(out, x.numpy()) - reference).max())
        except Exception:  # noqa: BLE001 - onnxruntime's contrib ops have no reference implementation
            err64 = math.nan
        rows.append((tool, bn_left, wrong, err, err64))
    return scale, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names from: " + ", ".join(MODELS))
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy overflow inside onnx's reference ops
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    print("| model (max \\|output\\|) | tool | BN left | wrong output | max \\|error\\|, float32 run "
          "| max \\|error\\|, float64 run |")
    print("|---|---|---:|---|---:|---:|")
    failures = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            scale, rows = measure(name, Path(tmp), args.seed)
        for tool, left, wrong, err, err64 in rows:
            print(f"| {name} ({scale:.3g}) | {tool} | {left} | {wrong} | {err:.3g} | "
                  f"{'n/a' if math.isnan(err64) else f'{err64:.3g}'} |", flush=True)
        ours = rows[1]
        # The fold's own rounding, compared with the peers that fold every BN and are right.
        best = min((r[4] for r in rows[2:] if r[1] == "0" and r[2] == "no" and not math.isnan(r[4])), default=math.inf)
        if ours[1] != "0" or ours[2] != "no" or not ours[4] <= best:
            failures.append(f"{name}: bnpipe BN left {ours[1]}, wrong {ours[2]}, float64-run error {ours[4]:.3g}, "
                            f"best peer that folds every BN {best:.3g}")
    print("PASS" if not failures else "FAIL\n" + "\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
