"""Milliseconds per onnxruntime run of the served model when the batch size changes between runs.

`bnpipe serve` batches whatever has arrived, so consecutive runs rarely share a batch size. This
times, on one session, runs of a constant size against runs whose size cycles, for a few provider
options, and the same cycle padded to one fixed size. On a GPU a run whose input shape differs from
the previous one can cost far more than the arithmetic.

    python benchmarks/ort_shapes.py [--model models/bn_convnet.onnx] [--device cuda] [--runs 100]
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from bnpipe.serve import runtime


def ms_per_run(model: runtime.Model, sizes: list[int], runs: int, pad_to: int | None = None) -> float:
    """Mean milliseconds of ``runs`` runs cycling through ``sizes`` (after one warm cycle)."""
    batches = {n: np.zeros((n, 1, 28, 28), np.uint8) for n in sizes}
    run = runtime.FixedRows(model.logits, pad_to) if pad_to else model.logits  # as `bnpipe serve` runs on CUDA
    for n in sizes:
        run(batches[n])
    t0 = time.perf_counter()
    for n in itertools.islice(itertools.cycle(sizes), runs):
        run(batches[n])
    return (time.perf_counter() - t0) / runs * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/bn_convnet.onnx")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    base = dict(runtime.CUDA_OPTIONS)
    variants = {"bnpipe's options": {}, "cudnn_conv_use_max_workspace 0": {"cudnn_conv_use_max_workspace": "0"},
                "algo search DEFAULT": {"cudnn_conv_algo_search": "DEFAULT"},
                "algo search EXHAUSTIVE": {"cudnn_conv_algo_search": "EXHAUSTIVE"}}
    for name, extra in variants.items():
        runtime.CUDA_OPTIONS.clear()
        runtime.CUDA_OPTIONS.update({**base, **extra})
        model = runtime.Model.load(args.model, args.device)
        cases = {"constant 8": ([8], None), "constant 256": ([256], None), "cycle 1..8": (list(range(1, 9)), None),
                 "alternate 8/64": ([8, 64], None), "cycle 1..8 padded to 64": (list(range(1, 9)), 64),
                 "cycle 1..8 padded to 256": (list(range(1, 9)), 256)}
        if name != "bnpipe's options":
            cases = {k: v for k, v in cases.items() if k in ("constant 8", "cycle 1..8")}
        print(f"{name} ({model.provider}): " + ", ".join(
            f"{case} {ms_per_run(model, sizes, args.runs, pad):.3f} ms" for case, (sizes, pad) in cases.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
