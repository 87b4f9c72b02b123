"""Inference speed: PyTorch eager vs onnxruntime, unfolded vs BN-folded, at batch 1, 64 and 1024.

One run exports the checkpoint twice (BN kept, BN folded), then times, interleaved in rounds so that
machine noise hits every variant alike:
  torch unfolded, torch folded, ORT unfolded (graph optimizations off / on), ORT folded.
It then checks the folded ONNX on the full MNIST test set against PyTorch eval.

    python benchmarks/inference.py --checkpoint models/bn_convnet.pt --data ../shared/data

Targets: folded ONNX at least as fast as ORT on the unfolded model (optimizations on) at every batch
size; on the 10,000 test images every argmax agrees and the max |logit diff| is <= 1e-4.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bnpipe.datadir import resolve_data_root
from bnpipe.export.fold import fold_batchnorms
from bnpipe.contract import INPUT_NAME, OUTPUT_NAME
from bnpipe.export.onnx_export import PixelsToLogits, compare_logits, load_net, torch_reference_logits
from bnpipe.export.pipeline import export_checkpoint
from bnpipe.train.data import load_mnist
from bnpipe.train.preprocess import Normalization

BATCHES = (1, 64, 1024)
TOLERANCE = 1e-4


NOISE = 0.95  # "at least as fast" allows 5%, this machine's spread between two runs of the same graph


def ort_runner(path: Path, optimize: bool) -> Callable[[np.ndarray], np.ndarray]:
    """A CPU onnxruntime session for ``path`` as a function pixels -> logits."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimize:  # keep what ORT's optimizer made of the graph, to compare the two models
        options.optimized_model_filepath = str(path.with_suffix(".ort-optimized.onnx"))
        options.log_severity_level = 3  # ORT warns that such a file is machine-specific; it is only read here
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


def torch_runner(module: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """PyTorch eager inference of ``module`` as a function pixels -> logits."""
    module.eval()

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(pixels)).numpy()

    return run


def time_block(fn: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, min_seconds: float) -> float:
    """Seconds per call, averaged over as many calls as fit in ``min_seconds``."""
    fn(pixels)  # warm-up
    calls, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_seconds:
        fn(pixels)
        calls += 1
    return elapsed / calls


def head_to_head(a: Callable[[np.ndarray], np.ndarray], b: Callable[[np.ndarray], np.ndarray],
                 pixels: np.ndarray, seconds: float) -> float:
    """Seconds of ``b`` over seconds of ``a``, calls alternating so that load drifts hit both alike.

    The pair order flips every time (a b, b a, ...), so neither always runs on a cache the other warmed.
    """
    spent = [0.0, 0.0]
    a(pixels), b(pixels)
    t_end, flip = time.perf_counter() + seconds, False
    while time.perf_counter() < t_end:
        for i in ((1, 0) if flip else (0, 1)):
            t0 = time.perf_counter()
            (a, b)[i](pixels)
            spent[i] += time.perf_counter() - t0
        flip = not flip
    return spent[1] / spent[0]


def main() -> int:
    """Print the table and the verdicts; return the exit status (0 when every target is met)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/bn_convnet.pt")
    parser.add_argument("--data", default=None, help="MNIST root (default: $BNPIPE_DATA, else ./data)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.2, help="per variant, batch size and round")
    args = parser.parse_args()
    root = resolve_data_root(args.data)
    images, _ = load_mnist(root, train=False)
    pixels_all = images.numpy()

    ckpt, net = load_net(args.checkpoint)
    norm = Normalization.from_dict(ckpt["preprocessing"])
    tmp = Path(tempfile.mkdtemp())
    export_checkpoint(args.checkpoint, tmp / "unfolded.onnx", fold_bn=False, data_root=root)
    export_checkpoint(args.checkpoint, tmp / "folded.onnx", fold_bn=True, data_root=root)
    variants = {
        "torch eager, unfolded": torch_runner(PixelsToLogits(net, norm)),
        "torch eager, folded": torch_runner(PixelsToLogits(fold_batchnorms(net, example_inputs=(
            norm.apply(torch.from_numpy(pixels_all[:2])),)).module, norm)),
        "ORT unfolded, opt off": ort_runner(tmp / "unfolded.onnx", optimize=False),
        "ORT unfolded, opt on": ort_runner(tmp / "unfolded.onnx", optimize=True),
        "ORT folded, opt on": ort_runner(tmp / "folded.onnx", optimize=True),
    }
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, CPU")
    ok = True
    header = f"{'batch':>5}  " + "  ".join(f"{name:>22}" for name in variants)
    print("images per second (best of rounds); ratio to ORT unfolded opt on in brackets")
    print(header)
    for batch in BATCHES:
        pixels = np.ascontiguousarray(pixels_all[:batch])
        per_call: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        for round_ in range(args.rounds):
            random.Random(round_).shuffle(order)  # no variant always runs first or last
            for name in order:
                per_call[name].append(time_block(variants[name], pixels, args.seconds))
        rate = {name: batch / min(times) for name, times in per_call.items()}  # best round: least disturbed
        base = rate["ORT unfolded, opt on"]
        print(f"{batch:>5}  " + "  ".join(f"{rate[n]:>12,.0f} ({rate[n] / base:4.2f}x)" for n in variants))
        # The gate: folded against unfolded (opt on) call by call, alternating; < 1 means folded is faster.
        time_ratio = head_to_head(variants["ORT unfolded, opt on"], variants["ORT folded, opt on"], pixels,
                                  args.seconds * args.rounds)
        head = f"head to head, alternating calls: folded takes {time_ratio:.3f}x the time of unfolded (opt on)"
        print(f"{'':>5}  {head}")
        ok &= time_ratio <= 1 / NOISE

    ops = [[n.op_type for n in onnx.load(str(tmp / f"{k}.ort-optimized.onnx")).graph.node] for k in ("unfolded", "folded")]
    print(f"after ORT's graph optimizations: unfolded {len(ops[0])} nodes, folded {len(ops[1])} nodes, "
          f"{'the same' if ops[0] == ops[1] else 'different'} op sequence")
    folded_logits = variants["ORT folded, opt on"](pixels_all)
    diff, agree = compare_logits(torch_reference_logits(args.checkpoint, pixels_all), folded_logits)
    full_ok = agree == 1.0 and diff <= TOLERANCE
    print(f"full test set ({len(pixels_all)} images): folded ONNX vs PyTorch eval: max |logit diff| {diff:.3g}, "
          f"argmax agreement {agree:.2%}  {'PASS' if full_ok else 'FAIL'}")
    print(f"folded ONNX at least as fast as ORT on the unfolded model (within {1 - NOISE:.0%}) at every batch size: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok and full_ok else 1


if __name__ == "__main__":
    sys.exit(main())
