"""Prove a rewritten ONNX model computes what the original did: onnxruntime (CPU) on random inputs."""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from bnpipe.errors import BnpipeError, one_line


def graph_stats(model: onnx.ModelProto) -> dict[str, int]:
    """Node count and BatchNormalization count of an ONNX model's main graph."""
    ops = collections.Counter(node.op_type for node in model.graph.node)
    return {"nodes": sum(ops.values()), "bn_nodes": ops["BatchNormalization"]}


DEFAULT_TOLERANCE = 1e-4
# Machine epsilon of the float types whose rounding noise passes DEFAULT_TOLERANCE.
_EPSILON = {onnx.TensorProto.FLOAT16: 2.0**-10, onnx.TensorProto.BFLOAT16: 2.0**-7}


def default_tolerance(model: onnx.ModelProto) -> float:
    """`DEFAULT_TOLERANCE`, or 8 epsilons of the narrowest float16/bfloat16 type among the outputs and weights.

    A float16 model's outputs move by about an epsilon when its weights are rounded differently (the
    fold rounds once, from float64); 1e-4 is under that noise, 8 epsilons are well over it and still
    far under what a wrong fold changes (the whole output).
    """
    types = [o.type.tensor_type.elem_type for o in model.graph.output] + [t.data_type for t in model.graph.initializer]
    return max([DEFAULT_TOLERANCE] + [8 * _EPSILON[t] for t in types if t in _EPSILON])


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME=1,3,224,224`` -> ``("NAME", (1, 3, 224, 224))``.

    Raises:
        BnpipeError: If the text is not a name, ``=``, and comma-separated positive integers (an
            empty tensor would prove nothing).
    """
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
    except ValueError:
        shape = (0,)
    if not sep or not name or any(d < 1 for d in shape):
        raise BnpipeError(f"--shape {text!r}: expected NAME=D1,D2,... with positive integers")
    return name, shape


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]  # IR < 4 lists initializers as inputs too


def dynamic_inputs(model: onnx.ModelProto) -> list[str]:
    """The names of the graph inputs with a dim of no fixed size."""
    return [i.name for i in _graph_inputs(model)
            if any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)]


def random_inputs(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """A random array of each graph input's type; dynamic dims are 1 unless ``shapes`` gives the input's shape.

    Raises:
        BnpipeError: ``shapes`` names no input, or gives an input a rank or fixed dim it does not have.
    """
    rng = np.random.default_rng(seed)
    inputs = _graph_inputs(model)
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        raise BnpipeError(f"--shape {sorted(unknown)[0]}: the model has no such input "
                          f"(inputs: {', '.join(i.name for i in inputs)})")  # fmt: skip
    feeds = {}
    for inp in inputs:
        tensor = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise BnpipeError(f"input {inp.name}: only tensor inputs can be verified")
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        if inp.name in shapes:
            given = list(shapes[inp.name])
            fixed = [(g, d.dim_value) for g, d in zip(given, tensor.shape.dim) if d.HasField("dim_value")]
            if len(given) != len(dims) or any(g != v for g, v in fixed):
                declared = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in tensor.shape.dim]
                raise BnpipeError(f"--shape {inp.name}={','.join(map(str, given))}: the input is "
                                  f"[{', '.join(map(str, declared))}] (fixed dims must match)")  # fmt: skip
            dims = given
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if np.issubdtype(dtype, np.bool_):
            feeds[inp.name] = rng.random(dims) < 0.5
        elif dtype == np.uint8:
            feeds[inp.name] = rng.integers(0, 256, dims, dtype=np.uint8)
        elif np.issubdtype(dtype, np.integer):
            feeds[inp.name] = rng.integers(0, 2, dims).astype(dtype)  # small: indices stay in range
        else:
            feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def run_cpu(model_path: str | os.PathLike[str], feeds: Mapping[str, np.ndarray], optimize: bool = False
            ) -> list[np.ndarray]:
    """Run a model file once on onnxruntime's CPU provider.

    Args:
        model_path: The ONNX file.
        feeds: Input name -> array.
        optimize: Let onnxruntime optimize the graph; off by default, to run the graph as written.

    Returns:
        Every output, in the graph's order.

    Raises:
        BnpipeError: onnxruntime cannot load or run it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # its own error log line would repeat the exception's, coloured
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        return session.run(None, dict(feeds))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/NotImplemented
        raise BnpipeError(f"{model_path}: onnxruntime {ort.__version__} cannot run it: {one_line(exc)}") from None


def relative_difference(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Max |candidate - reference| over max |reference|: error relative to the output's magnitude.

    NaN where the reference has NaN is equal; any other NaN, or a shape change, is ``inf``.
    """
    ref, got = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if ref.shape != got.shape:
        return float("inf")
    same = (ref == got) | (np.isnan(ref) & np.isnan(got))  # equal infinities and NaNs included
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(got - ref))
    if diff.size == 0:
        return 0.0
    if np.isnan(diff).any():
        return float("inf")
    finite = ref[np.isfinite(ref)]
    magnitude = float(np.max(np.abs(finite))) if finite.size else 0.0
    return float(np.max(diff)) / max(magnitude, np.finfo(np.float64).tiny)


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    """Replace the model's ``metadata_props`` with ``metadata``."""
    del model.metadata_props[:]
    helper.set_model_props(model, dict(metadata))
