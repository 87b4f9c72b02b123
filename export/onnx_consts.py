"""Constant values of an ONNX graph: initializers, Constant nodes, and what deterministic nodes compute from them.

Exporters with their optimizer off write a missing conv bias as ``Expand(CastLike(0, x), Shape(W))``;
evaluating such chains (with onnx's numpy reference runtime) lets that bias fold like an initializer.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

ONNX_DOMAINS = ("", "ai.onnx")
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
# Never evaluated: a quantized weight must stay quantized, so a BN after it stays in place.
_QUANTIZATION = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}
_MAX_DEPTH = 64  # a constant chain longer than this is not worth evaluating


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in a node's attributes (If, Loop, Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        yield from attr.graphs


class Constants:
    """Values fixed in the file, by value name.

    Args:
        model: The model; its graph may change between calls as long as values keep their names.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.opset = {o.domain or "": o.version for o in model.opset_import}.get("", 18)
        self.inits = {t.name: t for t in graph.initializer}
        # From IR 4 on, an initializer that is also a graph input is only a default the caller may override.
        self.overridable = {i.name for i in graph.input} if model.ir_version >= 4 else set()
        self.producers = {o: n for n in graph.node for o in n.output if o}
        self.elem_types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]
                           if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}  # fmt: skip
        self.cache: dict[str, np.ndarray | None] = {}
        self.computed: set[str] = set()  # outputs of non-Constant nodes evaluated here

    def get(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The value of ``name``, or None when it is not a constant."""
        if name not in self.cache:
            self.cache[name] = self._value(name, depth)
        return self.cache[name]

    def _value(self, name: str, depth: int) -> np.ndarray | None:
        if name in self.inits:
            return None if name in self.overridable else numpy_helper.to_array(self.inits[name])
        node = self.producers.get(name)
        if node is None or node.domain not in ONNX_DOMAINS or node.op_type in _RANDOM | _QUANTIZATION or depth > _MAX_DEPTH:
            return None
        if node.op_type == "Constant":
            return self._constant_node(node)
        if any(True for _ in subgraphs(node)):
            return None
        args: dict[str, np.ndarray] = {}
        for i, inp in enumerate(node.input):
            if not inp:
                continue
            value = self.get(inp, depth + 1)
            if value is None and node.op_type == "CastLike" and i == 1 and inp in self.elem_types:
                value = np.zeros(0, helper.tensor_dtype_to_np_dtype(self.elem_types[inp]))  # only its type is read
            if value is None:
                return None
            args[inp] = value
        try:
            from onnx.reference import ReferenceEvaluator

            outputs = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, args)
        except Exception:  # noqa: BLE001 - an op the reference runtime lacks: not a constant for us
            return None
        for out, value in zip(node.output, outputs):
            if out:
                self.cache[out] = np.asarray(value)
                self.computed.add(out)
        return self.cache.get(name)

    @staticmethod
    def _constant_node(node: onnx.NodeProto) -> np.ndarray | None:
        if len(node.attribute) != 1:
            return None
        attr = node.attribute[0]
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
        if attr.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(attr), dtype=np.int64)
        return None
