"""Fold eval-mode BatchNorm layers into the Conv, ConvTranspose or Linear layer that feeds them.

The arithmetic is :func:`bnpipe.export.fold_math.fold_bn_arrays` (float64 numpy, shared with the ONNX
fold), fed tensors by :func:`bnpipe.export.fold_params.fold_bn_params`. :func:`fold_batchnorms` finds the
foldable pairs in any module's forward graph with ``torch.fx`` and returns a new module; the module it is
given is never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvTransposeNd

from bnpipe.errors import BnpipeError, one_line
from bnpipe.export.fold_params import fold_bn_params, rounded

# Exact types, not isinstance: a subclass may override forward, and then folding could be wrong.
_FOLDABLE: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)  # fmt: skip


@dataclass
class FoldResult:
    """What :func:`fold_batchnorms` did.

    Attributes:
        module: The new module, in eval mode, with the folded BatchNorms removed.
        folded: ``(layer name, BatchNorm name)`` for each fold, in graph order.
        left: Names of the BatchNorms left in place, in graph order.
        reasons: For each name in ``left``, why it could not be folded.
    """

    module: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)


def check_foldable_bn(name: str, bn: _BatchNorm) -> None:
    """Refuse a BatchNorm whose eval-mode statistics cannot be folded.

    A BatchNorm without running statistics is not refused here: it normalizes with each batch's own
    statistics, so it is left in place (see :func:`_why_not_foldable`), as ``torch.fx``'s own fuse does.

    Args:
        name: The BatchNorm's qualified name in the model, used in the message.
        bn: The BatchNorm module.

    Raises:
        BnpipeError: If it is in training mode, or its running statistics are not usable.
    """
    if bn.training:
        raise BnpipeError(f"{name}: BatchNorm is in training mode; call model.eval() before folding")
    if not _has_running_stats(bn):
        return
    if not torch.isfinite(bn.running_var).all():
        raise BnpipeError(f"{name}: BatchNorm running_var has non-finite values")
    if (bn.running_var < 0).any():
        raise BnpipeError(f"{name}: BatchNorm running_var has negative values")
    if not torch.isfinite(bn.running_mean).all():
        raise BnpipeError(f"{name}: BatchNorm running_mean has non-finite values")


def _has_running_stats(bn: _BatchNorm) -> bool:
    return bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None


def _bn_input(bn_node: fx.Node) -> object:
    """The BatchNorm call's input, given by position or as ``input=`` (its name in ``forward``)."""
    return bn_node.args[0] if bn_node.args else bn_node.kwargs.get("input")


# BatchNorm{k}d normalizes axis 1 of a (k + 2)-D input; it must follow a Conv{k}d or ConvTranspose{k}d.
_BN_DIMS: dict[type[nn.Module], int] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _references(graph: fx.Graph, name: str) -> int:
    """Count the nodes that call module ``name`` or read one of its attributes."""
    return sum(
        1
        for node in graph.nodes
        if (node.op == "call_module" and node.target == name)
        or (node.op == "get_attr" and str(node.target).startswith(name + "."))
    )


def _why_not_foldable(gm: fx.GraphModule, bn_node: fx.Node) -> str | None:
    """Return why the BatchNorm at ``bn_node`` cannot be folded into its input, or None if it can.

    BatchNorm normalizes axis 1. That is a conv's channel axis only when the conv is batched (output rank
    ``weight.dim()``), and a Linear's feature axis only for a 2-D [N, C] output: the shapes recorded by
    ``ShapeProp`` (``node.meta["tensor_meta"]``) prove it, and the BatchNorm's kind must match the layer's.
    """
    bn = gm.get_submodule(str(bn_node.target))
    if not _has_running_stats(bn):
        return "it has no running statistics (track_running_stats=False): it normalizes with each batch's own"
    src = _bn_input(bn_node)
    if not isinstance(src, fx.Node) or src.op != "call_module":
        what = f"{src.op} {getattr(src.target, '__name__', src.target)}" if isinstance(src, fx.Node) else src
        return f"its input is not a Conv/ConvTranspose/Linear layer (it is {what})"
    layer_name = str(src.target)
    layer = gm.get_submodule(layer_name)
    if type(layer) not in _FOLDABLE:
        return f"its input {layer_name} is not a Conv/ConvTranspose/Linear layer"
    if len(src.users) != 1:
        return f"the output of {layer_name} is also used elsewhere; folding would change that use"
    if _references(gm.graph, layer_name) != 1:
        return f"{layer_name} is used more than once; folding would change its other uses"
    meta = src.meta.get("tensor_meta")
    if meta is None:
        return f"pass example_inputs to prove that the BatchNorm normalizes {layer_name}'s output channels"
    shape = list(meta.shape)
    if isinstance(layer, nn.Linear):
        if type(bn) is not nn.BatchNorm1d:
            return f"a Linear ({layer_name}) folds only into a BatchNorm1d"
        if len(shape) != 2:
            return f"{layer_name}'s output is {shape}: BatchNorm1d normalizes axis 1, the Linear maps the last axis"
        return None
    dims = layer.weight.dim() - 2
    if len(shape) != dims + 2:  # an unbatched conv: axis 1 is not its channel axis
        return f"{layer_name}'s output is {shape}, unbatched: the BatchNorm's axis 1 is not its channel axis"
    bn_dims = next((d for t, d in _BN_DIMS.items() if isinstance(bn, t)), dims)  # SyncBatchNorm: any rank
    if bn_dims != dims:
        return f"a BatchNorm{bn_dims}d does not follow a {dims}-D layer ({layer_name})"
    return None


def _fold_into(layer: nn.Module, bn: _BatchNorm, exact: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Replace ``layer``'s weight and bias (created if missing) by their fold with ``bn``.

    ``exact`` is the float64 ``(weight, bias)`` of an earlier fold into this layer (two BNs in a row):
    the fold starts from it, so the layer is rounded once for both. Returns this fold's float64 pair, on
    the CPU (float64 in, so `fold_bn_params`'s rounding is exact).
    """

    def float64(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to("cpu", torch.float64)

    weight, bias = exact or (float64(layer.weight), float64(layer.bias))
    w64, b64 = fold_bn_params(
        weight, bias, bn.running_mean, bn.running_var, bn.eps, float64(bn.weight), float64(bn.bias),
        transposed=isinstance(layer, _ConvTransposeNd), groups=getattr(layer, "groups", 1),
    )  # fmt: skip
    dtype, device = layer.weight.dtype, layer.weight.device
    bias_dtype = dtype if layer.bias is None else layer.bias.dtype
    requires_grad = layer.weight.requires_grad  # a created bias trains like the weight
    layer.weight = nn.Parameter(rounded(w64.numpy(), dtype).to(device), requires_grad=requires_grad)
    layer.bias = nn.Parameter(rounded(b64.numpy(), bias_dtype).to(device), requires_grad=requires_grad)
    return w64, b64


def fold_batchnorms(
    model: nn.Module, *, strict: bool = False, example_inputs: Sequence[Tensor] | None = None
) -> FoldResult:
    """Fold every BatchNorm that directly follows a Conv, ConvTranspose or Linear layer.

    The model is traced with ``torch.fx``; a BatchNorm is folded when its input is the output of a
    plain Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear module that nothing else uses, and the shapes
    recorded on ``example_inputs`` prove that the BatchNorm's axis 1 is that layer's output-channel axis:
    a batched conv output followed by the BatchNorm of its own rank, or a Linear output ``[N, C]``
    followed by a BatchNorm1d. Anything else, and a BatchNorm without running statistics, is left in
    place with its reason.

    Args:
        model: Any traceable module. It is deep-copied and never changed.
        strict: If True, a BatchNorm that cannot be folded is an error instead of being left in place.
        example_inputs: Inputs to run the traced copy once, recording every tensor's shape; without
            them nothing is folded (each BatchNorm is left, with the reason).

    Returns:
        A :class:`FoldResult` whose module is a new ``torch.fx.GraphModule`` in eval mode.

    Raises:
        BnpipeError: If the model cannot be traced, a BatchNorm is refused by :func:`check_foldable_bn`,
            or (with ``strict``) a BatchNorm cannot be folded. The message names the module.
    """
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model))
    except Exception as exc:  # fx raises many types; the user needs one line naming the model
        raise BnpipeError(f"{type(model).__name__}: cannot be traced by torch.fx: {one_line(exc)}") from exc
    if example_inputs is not None:
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*example_inputs)
        except Exception as exc:  # the model's own error, on the caller's inputs
            raise BnpipeError(f"{type(model).__name__}: fails on example_inputs: {one_line(exc)}") from exc
    result = FoldResult(module=gm)
    exact: dict[str, tuple[Tensor, Tensor]] = {}  # layer name -> its float64 (weight, bias), BN after BN only
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(bn := gm.get_submodule(node.target), _BatchNorm):
            continue
        bn_name = str(node.target)
        check_foldable_bn(bn_name, bn)
        reason = _why_not_foldable(gm, node)
        layer_node = _bn_input(node)
        if reason is None:
            try:
                name = str(layer_node.target)
                folded64 = _fold_into(gm.get_submodule(name), bn, exact.pop(name, None))
                if any(u.op == "call_module" and isinstance(gm.get_submodule(str(u.target)), _BatchNorm)
                       for u in node.users):  # another BatchNorm reads this one: keep it for that fold
                    exact[name] = folded64
            except ValueError as exc:  # channel mismatch, e.g. a BatchNorm1d over a [N, L, F] Linear output
                reason = str(exc)
        if reason is not None:
            if strict:
                raise BnpipeError(f"{bn_name}: BatchNorm cannot be folded: {reason}")
            if bn_name not in result.reasons:
                result.left.append(bn_name)
                result.reasons[bn_name] = reason
            continue
        node.replace_all_uses_with(layer_node)  # the layer's output now is the BN's output
        gm.graph.erase_node(node)
        result.folded.append((str(layer_node.target), bn_name))
    # A BatchNorm called more than once stays while any call to it is left.
    for bn_name in dict.fromkeys(bn for _, bn in result.folded):
        if _references(gm.graph, bn_name) == 0:
            gm.delete_submodule(bn_name)
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return result
