"""Fold BatchNormalization nodes of an ONNX graph into the Conv, ConvTranspose, Gemm or MatMul+Add before them.

Only exact folds are made; every BN left in place gets its reason. The arithmetic is
:func:`bnpipe.export.fold_math.fold_bn_arrays`, shared with the PyTorch-side fold.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnpipe.errors import BnpipeError
from bnpipe.export.fold_math import fold_bn_arrays, round_once
from bnpipe.export.onnx_consts import ONNX_DOMAINS, Constants, subgraphs

@dataclass
class GraphFold:
    """What :func:`fold_graph` did: ``(producer, BN)`` node names folded, and BN name -> why it was left."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)


@dataclass
class _Plan:
    """One exact fold: the weight in ``[C_out, ...]`` layout and the node inputs to rewrite."""

    producer: onnx.NodeProto  # the Conv/ConvTranspose/Gemm/MatMul holding the weight
    weight: np.ndarray
    bias: np.ndarray | None
    bias_node: onnx.NodeProto  # takes the bias at input ``bias_slot`` (Add for MatMul); its output becomes the BN's
    bias_slot: int
    transposed: bool = False
    groups: int = 1
    layout_t: bool = False  # the stored weight is [K, C_out]: fold its transpose
    alpha: float = 1.0
    beta: float = 1.0


def _uses(graph: onnx.GraphProto) -> collections.Counter[str]:
    """How often each value name is read: node inputs (subgraphs included) and graph outputs."""
    count: collections.Counter[str] = collections.Counter(o.name for o in graph.output)
    for node in graph.node:
        count.update(name for name in node.input if name)
        for sub in subgraphs(node):
            count.update(_uses(sub))
    return count


def node_name(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or ``op_type#index`` for an unnamed one."""
    return node.name or f"{node.op_type}#{index}"


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Value name -> rank, from ONNX shape inference (empty when it cannot run, e.g. past 2 GB)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - no shapes only means fewer folds are proven
        return {}
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in infos
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}  # fmt: skip


def _plan(bn: onnx.NodeProto, producers: dict[str, onnx.NodeProto], uses: collections.Counter[str],
          consts: Constants, ranks: dict[str, int], names: dict[int, str]) -> _Plan | str:
    """The fold of ``bn`` into its producer, or the reason it is not exact."""
    src = producers.get(bn.input[0])
    if src is None:
        return "its input is a graph input, not the output of a layer"
    pname = names[id(src)]
    if uses[bn.input[0]] != 1:
        return f"the output of {pname} is also used elsewhere; folding would change that use"
    attrs = {a.name: helper.get_attribute_value(a) for a in src.attribute}
    if src.domain not in ONNX_DOMAINS or src.op_type not in ("Conv", "ConvTranspose", "Gemm", "Add"):
        return f"its input comes from {src.op_type} {pname}, not Conv, ConvTranspose, Gemm or MatMul+Add"
    if src.op_type == "Add":
        return _plan_matmul_add(src, producers, uses, consts, ranks, names)
    weight = consts.get(src.input[1])
    if weight is None:
        return f"the weight {src.input[1]!r} of {pname} is not a constant"
    bias_name = src.input[2] if len(src.input) > 2 else ""
    bias = consts.get(bias_name) if bias_name else None
    if bias_name and bias is None:
        return f"the bias {bias_name!r} of {pname} is not a constant"
    if src.op_type == "Gemm":
        # [M, K] x W -> [M, N]: BN's axis 1 is the Gemm's output axis. W is [N, K] with transB, else [K, N].
        return _Plan(src, weight, bias, src, 2, layout_t=not attrs.get("transB", 0),
                     alpha=attrs.get("alpha", 1.0), beta=attrs.get("beta", 1.0))  # fmt: skip
    # Conv/ConvTranspose output is [N, C_out, *spatial]: BN's axis 1 is the output-channel axis.
    return _Plan(src, weight, bias, src, 2, transposed=src.op_type == "ConvTranspose", groups=attrs.get("group", 1))


def _plan_matmul_add(add: onnx.NodeProto, producers: dict[str, onnx.NodeProto], uses: collections.Counter[str],
                     consts: Constants, ranks: dict[str, int], names: dict[int, str]) -> _Plan | str:
    """MatMul([N, K], constant [K, C]) + constant bias, then the BN."""
    slots = [i for i, name in enumerate(add.input) if consts.get(name) is None]
    matmul = producers.get(add.input[slots[0]]) if len(slots) == 1 else None
    if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in ONNX_DOMAINS:
        return f"its input comes from Add {names[id(add)]}, which is not MatMul + a constant bias"
    bias_slot = 1 - slots[0]
    bias, weight = consts.get(add.input[bias_slot]), consts.get(matmul.input[1])
    mname = names[id(matmul)]
    if uses[matmul.output[0]] != 1:
        return f"the output of {mname} is also used elsewhere; folding would change that use"
    if weight is None or weight.ndim != 2:
        return f"the weight {matmul.input[1]!r} of {mname} is not a constant 2-D matrix"
    if ranks.get(matmul.input[0]) != 2 or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
        return f"the shapes do not prove that {mname} + bias gives [N, C] with the bias per C"
    return _Plan(matmul, weight, bias.reshape(-1), add, bias_slot, layout_t=True)


def _fresh(base: str, taken: set[str]) -> str:
    name, i = f"{base}_bnfolded", 1
    while name in taken:
        name, i = f"{base}_bnfolded_{i}", i + 1
    taken.add(name)
    return name


@dataclass
class _Index:
    """Who reads and who writes each value, kept up to date across folds instead of rebuilt for each BN.

    The BNs folded and the producers' old output names are dropped from the graph once, at the end:
    removing a node from a protobuf list is a scan of it, so per BN both made a fold quadratic
    (800 BNs took 4.4 s, now 0.09 s: `benchmarks/fold_scale.py`).
    """

    uses: collections.Counter[str]  # value name -> reads (node inputs, subgraphs included, graph outputs)
    producers: dict[str, onnx.NodeProto]  # value name -> the node writing it
    folded_bns: set[int] = field(default_factory=set)  # id() of each BN folded away
    gone: set[str] = field(default_factory=set)  # value names no node writes any more
    chained: set[str] = field(default_factory=set)  # values some BN reads: a BN writing one may have a second
    # The float64 value of the initializers a fold wrote for a BN another BN reads (Conv, BN, BN): the
    # second folds from it, so the weight is rounded once for both. Kept for those folds only.
    exact: dict[str, np.ndarray] = field(default_factory=dict)

    def set_input(self, node: onnx.NodeProto, slot: int, name: str) -> None:
        while len(node.input) <= slot:
            node.input.append("")
        if node.input[slot]:
            self.uses[node.input[slot]] -= 1
        self.uses[name] += 1
        node.input[slot] = name


def _apply(graph: onnx.GraphProto, bn: onnx.NodeProto, plan: _Plan, stats: list[np.ndarray], eps: float,
           taken: set[str], listed_as_inputs: bool, index: _Index, consts: Constants) -> None:
    """Write the folded weight and bias as new initializers and route the producer to the BN's output."""
    gamma, beta, mean, var = stats
    weight = index.exact.pop(plan.producer.input[1], plan.weight)
    w = weight.T if plan.layout_t else weight
    bias_name = plan.bias_node.input[plan.bias_slot] if len(plan.bias_node.input) > plan.bias_slot else ""
    bias = None if plan.bias is None else plan.beta * index.exact.pop(bias_name, plan.bias).astype(np.float64)
    w64, b64 = fold_bn_arrays(plan.alpha * w.astype(np.float64), bias, mean, var, eps, gamma, beta,
                              transposed=plan.transposed, groups=plan.groups)  # fmt: skip
    w_new = round_once(w64.T if plan.layout_t else w64, plan.weight.dtype)
    b_new = round_once(b64, plan.weight.dtype)  # ONNX: a layer's bias has its weight's type
    # New initializers: a weight shared with another node keeps its old value there.
    w_name, b_name = _fresh(plan.producer.input[1], taken), _fresh(f"{bn.output[0]}_bias", taken)
    new = [numpy_helper.from_array(w_new, w_name), numpy_helper.from_array(b_new, b_name)]
    if bn.output[0] in index.chained:
        index.exact.update({w_name: w64.T if plan.layout_t else w64, b_name: b64})
        consts.cache.update({w_name: w_new, b_name: b_new})  # the next BN's plan sees them as constants
    graph.initializer.extend(new)
    if listed_as_inputs:  # IR < 4: every initializer is also a graph input
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in new)
    index.set_input(plan.producer, 1, w_name)
    index.set_input(plan.bias_node, plan.bias_slot, b_name)
    if plan.producer.op_type == "Gemm":
        kept = [a for a in plan.producer.attribute if a.name not in ("alpha", "beta")]
        del plan.producer.attribute[:]
        plan.producer.attribute.extend(kept)  # alpha and beta are inside the folded W and C now
    old = plan.bias_node.output[0]
    plan.bias_node.output[0] = bn.output[0]  # the BN's output name stays: it may be a graph output
    del index.producers[old]
    index.producers[bn.output[0]] = plan.bias_node
    index.gone.add(old)
    index.uses.subtract(name for name in bn.input if name)
    index.folded_bns.add(id(bn))


def _drop_unused(graph: onnx.GraphProto, candidates: set[str], computed: set[str]) -> None:
    """Remove what the folds left unread: constant nodes and chains, and initializers, among ``candidates``."""
    candidates = set(candidates)
    while True:
        uses = _uses(graph)
        dead = [n for n in graph.node if any(o in candidates for o in n.output) and not any(uses[o] for o in n.output)
                and (n.op_type == "Constant" or all(o in computed for o in n.output if o))]  # fmt: skip
        if not dead:
            break
        for node in dead:
            candidates.update(node.input)
            graph.node.remove(node)
    dead_inits = {t.name for t in graph.initializer if t.name in candidates and not uses[t.name]}
    kept_inits = [t for t in graph.initializer if t.name not in dead_inits]
    kept_inputs = [i for i in graph.input if i.name not in dead_inits]  # IR < 4 lists initializers as inputs
    del graph.initializer[:], graph.input[:]
    graph.initializer.extend(kept_inits)
    graph.input.extend(kept_inputs)


def fold_graph(model: onnx.ModelProto) -> GraphFold:
    """Fold, in place, every BatchNormalization of the main graph that can be folded exactly.

    Args:
        model: The model; its graph is rewritten in place.

    Returns:
        The folded ``(producer, BN)`` node names and each BN left, with its reason.

    Raises:
        BnpipeError: A BatchNormalization in training mode (``training_mode=1``), naming the node.
    """
    graph, result = model.graph, GraphFold()
    nodes = list(graph.node)  # holds each node's wrapper, so that id() names it for the whole pass
    names = {id(n): node_name(n, i) for i, n in enumerate(nodes)}
    bns = [n for n in graph.node if n.op_type == "BatchNormalization" and n.domain in ONNX_DOMAINS]
    ranks = _ranks(model) if any(n.op_type == "MatMul" for n in graph.node) else {}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {
        i.name for i in graph.input}  # fmt: skip
    touched: set[str] = set()
    consts = Constants(model)
    index = _Index(_uses(graph), {o: n for n in graph.node for o in n.output if o}, chained={b.input[0] for b in bns})
    bn_attrs = {id(bn): {a.name: helper.get_attribute_value(a) for a in bn.attribute} for bn in bns}
    for bn in bns:  # refused before any fold: the graph is never left half-folded
        attrs = bn_attrs[id(bn)]
        if attrs.get("training_mode", 0):
            raise BnpipeError(f"{names[id(bn)]}: BatchNormalization has training_mode=1; only inference-form BNs fold")
        if any(bn.output[1:]):  # before opset 14 the outputs say the mode: more than Y means training
            raise BnpipeError(f"{names[id(bn)]}: BatchNormalization has {sum(map(bool, bn.output))} outputs, "
                              "the training form; only inference-form BNs fold")
    for bn in bns:
        name, attrs = names[id(bn)], bn_attrs[id(bn)]
        stats = [consts.get(p) for p in bn.input[1:5]]
        if attrs.get("spatial", 1) == 0:
            reason: _Plan | str = "spatial=0: it normalizes each element, not each channel"
        elif any(s is None for s in stats):
            reason = "a scale, bias, mean or variance input is not a constant"
        elif len({s.shape for s in stats}) != 1 or stats[0].ndim != 1:
            reason = f"its scale, bias, mean and variance shapes differ or are not [C]: {[s.shape for s in stats]}"
        elif not (np.isfinite(stats[3]).all() and (stats[3] >= 0).all() and np.isfinite(stats[2]).all()):
            reason = "its variance or mean has non-finite or negative values"
        else:
            reason = _plan(bn, index.producers, index.uses, consts, ranks, names)
        if isinstance(reason, _Plan):
            try:
                touched.update({*reason.producer.input[1:], *reason.bias_node.input, *bn.input[1:]})
                _apply(graph, bn, reason, stats, attrs.get("epsilon", 1e-5), taken,
                       model.ir_version < 4, index, consts)
                result.folded.append((names[id(reason.producer)], name))
                continue
            except ValueError as exc:  # channel counts differ: the BN does not normalize that output
                reason = str(exc)
        result.left[name] = reason
    if index.folded_bns:
        kept_nodes = [n for n in nodes if id(n) not in index.folded_bns]
        kept_info = [v for v in graph.value_info if v.name not in index.gone]
        del graph.node[:], graph.value_info[:]
        graph.node.extend(kept_nodes)
        graph.value_info.extend(kept_info)
    _drop_unused(graph, touched, consts.computed)
    return result
