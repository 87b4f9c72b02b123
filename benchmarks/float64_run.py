"""Run an ONNX graph in float64, to measure a fold's weight rounding apart from float32 inference rounding.

Used by ``onnx_fold_peers.py``: the graph's float32 values are widened exactly to float64 and onnx's numpy
reference runtime computes it, so what differs from a float64 reference is what the stored values carry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto as TP
from onnx import numpy_helper
from onnx.reference.op_run import OpRun

from bnpipe.export.onnx_consts import Constants


def constants_folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node computed from constants only replaced by its value, computed in the model's own types.

    A tool may leave the fold's arithmetic in the graph (``Mul(W, scale)``); onnxruntime computes that in
    float32 when the model runs, so it is computed here in float32 too, before :func:`as_float64` widens.
    """
    consts = Constants(model)
    values = {o: consts.get(o) for n in model.graph.node for o in n.output if o and n.op_type != "Constant"}
    folded = [n for n in model.graph.node if n.output and all(values.get(o) is not None for o in n.output if o)]
    for node in folded:
        model.graph.node.remove(node)
        model.graph.initializer.extend(numpy_helper.from_array(values[o], o) for o in node.output if o)
    return model


def as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float64: float tensors widened (their values exactly kept), casts retargeted."""
    floats = (TP.FLOAT, TP.FLOAT16, TP.BFLOAT16)
    model = constants_folded(onnx.ModelProto.FromString(model.SerializeToString()))

    def widen(t: onnx.TensorProto) -> None:
        if t.data_type in floats:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    for t in model.graph.initializer:
        widen(t)
    del model.graph.value_info[:]
    for v in [*model.graph.input, *model.graph.output]:
        if v.type.tensor_type.elem_type in floats:
            v.type.tensor_type.elem_type = TP.DOUBLE
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i in floats:
                attr.i = TP.DOUBLE
            if attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
    return model


class _ConvTranspose(OpRun):
    """onnx's reference ConvTranspose fails on groups > 1 (a reshape error); torch computes it in float64."""

    op_domain = ""

    def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,  # noqa: ANN001
             output_padding=None, output_shape=None, pads=None, strides=None):  # noqa: ANN001, ANN202
        nd = w.ndim - 2
        pads = list(pads) if pads is not None else [0] * 2 * nd
        if (auto_pad not in (None, "NOTSET")) or output_shape is not None or pads[:nd] != pads[nd:]:
            raise NotImplementedError("ConvTranspose with auto_pad, output_shape or asymmetric pads")
        conv = getattr(torch.nn.functional, f"conv_transpose{nd}d")
        x, w, b = (None if t is None else torch.from_numpy(np.array(t)) for t in (x, w, b))  # writable copies
        y = conv(x, w, b,
                 stride=list(strides or [1] * nd), padding=pads[:nd], output_padding=list(output_padding or [0] * nd),
                 groups=group or 1, dilation=list(dilations or [1] * nd))  # fmt: skip
        return (y.numpy(),)


def run64(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's output computed in float64 by onnx's numpy reference runtime."""
    from onnx.reference import ReferenceEvaluator

    model = as_float64(onnx.load(str(path)))
    evaluator = ReferenceEvaluator(model, new_ops=[type("ConvTranspose", (_ConvTranspose,), {})])
    return evaluator.run(None, {model.graph.input[0].name: x.astype(np.float64)})[0]
