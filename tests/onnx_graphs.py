"""Small ONNX graphs for the `bnpipe fold` tests, built with onnx.helper, and an independent check of a fold."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

IR_VERSION = 10  # what onnxruntime 1.31 reads


def bn_stats(channels: int, seed: int = 0, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """BN parameters mixing the edge cases: variance near zero, gamma large (1e3) and tiny (1e-4)."""
    rng = np.random.default_rng(seed)
    var = rng.uniform(0.5, 2.0, channels)
    var[1::2] *= 1e-8
    gamma = rng.uniform(0.5, 1.5, channels) * np.resize([1.0, 1.0, 1e3, 1e3, 1e-4, 1e-4], channels)
    values = {"gamma": gamma, "beta": rng.uniform(-1, 1, channels), "mean": rng.uniform(-2, 2, channels), "var": var}
    return {k: v.astype(dtype) for k, v in values.items()}


def bn_node(x: str, y: str, prefix: str, eps: float = 1e-3, **attrs: object) -> onnx.NodeProto:
    """A BatchNormalization reading ``{prefix}.gamma/beta/mean/var``."""
    inputs = [x, *(f"{prefix}.{k}" for k in ("gamma", "beta", "mean", "var"))]
    return helper.make_node("BatchNormalization", inputs, [y], name=f"{prefix}", epsilon=eps, **attrs)


def make_model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int | str]], outputs: list[str],
               inits: dict[str, np.ndarray], elem: int = onnx.TensorProto.FLOAT, opset: int = 18,
               ir_version: int = IR_VERSION) -> onnx.ModelProto:  # fmt: skip
    """A model of ``nodes`` with inputs of the given shapes, and outputs typed by shape inference."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, elem, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, elem, None) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    outputs_typed = onnx.shape_inference.infer_shapes(model).graph.output
    del model.graph.output[:]
    model.graph.output.extend(outputs_typed)
    return model


def with_bn(prefix: str, channels: int, seed: int = 0, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """Initializers for :func:`bn_node` ``prefix``."""
    return {f"{prefix}.{k}": v for k, v in bn_stats(channels, seed, dtype).items()}


def layer_bn(op: str, dims: int = 2, group: int = 1, bias: bool = True, dtype: type = np.float32,
             elem: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:  # fmt: skip
    """``op`` (Conv or ConvTranspose, 4 -> 6 channels, kernel 3) then a BN; input ``x``, output ``y``."""
    rng = np.random.default_rng(1)
    shape = (6, 4 // group, *[3] * dims) if op == "Conv" else (4, 6 // group, *[3] * dims)
    inits = {"w": rng.standard_normal(shape).astype(dtype), **with_bn("bn", 6, dtype=dtype)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = rng.standard_normal(6).astype(dtype)
        inputs.append("b")
    nodes = [helper.make_node(op, inputs, ["h"], name="layer", group=group), bn_node("h", "y", "bn")]
    return make_model(nodes, {"x": [2, 4, *[5] * dims]}, ["y"], inits, elem=elem)


def ops(model: onnx.ModelProto) -> collections.Counter[str]:
    """op_type counts of the main graph."""
    return collections.Counter(n.op_type for n in model.graph.node)


def run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of onnxruntime (CPU, optimizations off) on ``feeds``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_same_per_channel(got: np.ndarray, want: np.ndarray, rtol: float = 2e-5) -> None:
    """Equal within ``rtol`` of each channel's (axis 1) magnitude, +1 for channels of values near zero."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    assert got.shape == want.shape
    other = tuple(d for d in range(want.ndim) if d != 1)
    scale = np.abs(want).max(axis=other, keepdims=True) + 1.0
    worst = float((np.abs(got - want) / scale).max())
    assert worst < rtol, f"error {worst:.2e} of the channel's magnitude"
