"""How `bnpipe fold` scales with the number of BNs: time per BN at 800 BNs against at 100.

A chain of Conv 1x1 (4 -> 4 channels), BN and ReLU, repeated N times, is folded in memory
(`fold_graph`, best of 3 per size). Target: at most 2x the time per BN of the 100-BN graph (the
fold that rebuilt its indexes for each BN was 7.2x: 4.4 s for 800 BNs, against 0.09 s now).

Usage: python benchmarks/fold_scale.py
Exits 1 if the target is missed.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnpipe.export.onnx_fold import fold_graph

SIZES, TARGET = (100, 200, 400, 800), 2.0


def chain(n: int) -> onnx.ModelProto:
    """``n`` blocks of Conv 1x1, BN, ReLU on a [1, 4, 8, 8] input."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(n):
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), f"w{i}"))
        inits += [numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, f"{k}{i}") for k in "sbmv"]
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                  helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"y{i}"],
                                   name=f"bn{i}"),
                  helper.make_node("Relu", [f"y{i}"], [f"r{i}"])]  # fmt: skip
        x = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> int:
    per_bn = {}
    for n in SIZES:
        times = []
        for _ in range(3):
            model = chain(n)
            t0 = time.perf_counter()
            folded = fold_graph(model).folded
            times.append(time.perf_counter() - t0)
            assert len(folded) == n
        per_bn[n] = min(times) / n
        print(f"{n:>4} BNs: {min(times) * 1e3:8.1f} ms, {per_bn[n] * 1e6:6.1f} us per BN")
    ratio = per_bn[SIZES[-1]] / per_bn[SIZES[0]]
    good = ratio <= TARGET
    print(f"time per BN at {SIZES[-1]} vs {SIZES[0]} BNs: {ratio:.2f}x (target <= {TARGET}x) {'ok' if good else 'MISSED'}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
