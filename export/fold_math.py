"""The BatchNorm fold arithmetic, once, in float64 numpy: no torch, no onnx.

Both folds call it: :mod:`bnpipe.export.fold` (PyTorch modules) and :mod:`bnpipe.export.onnx_fold`
(ONNX graphs). The caller rounds the float64 results once, to the layer's own dtype.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

ArrayLike = npt.ArrayLike
F64 = npt.NDArray[np.float64]


def bn_scale(var: ArrayLike, eps: float, gamma: ArrayLike | None) -> F64:
    """The per-channel factor ``gamma / sqrt(var + eps)`` in float64: ``[C]``."""
    scale = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + float(eps))
    return scale if gamma is None else scale * np.asarray(gamma, dtype=np.float64)


def fold_bn_arrays(
    weight: ArrayLike,
    bias: ArrayLike | None,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[F64, F64]:
    """Fold BatchNorm statistics into the weight and bias of the layer before it, in float64.

    ``w' = w * gamma / sqrt(var + eps)`` per output channel, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

    Args:
        weight: Conv, Linear or Gemm (``[N, K]``) weight ``[C_out, C_in/groups, *k]``; with ``transposed``, a
            ConvTranspose weight ``[C_in, C_out/groups, *k]``.
        bias: The layer's bias, whose last axis is the output channel (``[C_out]``, or ``[M, C_out]`` for a
            Gemm's full bias); None for none (zeros).
        mean: Running mean ``[C_out]``.
        var: Running variance ``[C_out]``; the caller checks it is finite and >= 0.
        eps: That BatchNorm's own epsilon.
        gamma: Scale ``[C_out]``, or None (ones).
        beta: Shift ``[C_out]``, or None (zeros).
        transposed: True for the ConvTranspose layout.
        groups: The layer's groups; only the transposed layout depends on it.

    Returns:
        ``(weight, bias)`` in float64: the weight in ``weight``'s shape, the bias ``[C_out]`` (or ``bias``'s
        broadcast shape with ``[C_out]``).

    Raises:
        ValueError: If the BatchNorm's channel count is not the layer's output channel count.
    """
    w = np.asarray(weight, dtype=np.float64)
    m = np.asarray(mean, dtype=np.float64).reshape(-1)
    channels = m.shape[0]
    layer_out = w.shape[1] * groups if transposed else w.shape[0]
    if layer_out != channels:
        raise ValueError(f"BatchNorm has {channels} channels but the layer outputs {layer_out}")
    scale = bn_scale(np.reshape(var, -1), eps, None if gamma is None else np.reshape(gamma, -1))
    if transposed:
        # [C_in, C_out/g, *k] -> [g, C_in/g, C_out/g, *k]; output channel g*(C_out/g)+j sits at
        # (group g, column j), so the scale is laid out as [g, 1, C_out/g, 1...].
        per_group = channels // groups
        grouped = w.reshape(groups, w.shape[0] // groups, per_group, *w.shape[2:])
        w = (grouped * scale.reshape(groups, 1, per_group, *[1] * (w.ndim - 2))).reshape(w.shape)
    else:
        w = w * scale.reshape(channels, *([1] * (w.ndim - 1)))  # [C_out, 1, 1...]
    b = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64)
    b = (b - m) * scale  # the channel is the last axis of b
    if beta is not None:
        b = b + np.asarray(beta, dtype=np.float64).reshape(-1)
    return w, b


def round_once(x: F64, dtype: npt.DTypeLike) -> np.ndarray:
    """Round float64 values to ``dtype`` (float32, float16, bfloat16 or float64) with a single rounding.

    numpy rounds float64 to float32 and float16 directly. ml_dtypes goes to bfloat16 through float32, a
    double rounding; rounding to float32 *to odd* first (truncate, then set the last bit when inexact)
    makes the second rounding the only one, since float32 keeps 16 more bits than bfloat16.
    """
    import ml_dtypes

    x = np.asarray(x, dtype=np.float64)
    if np.dtype(dtype) != np.dtype(ml_dtypes.bfloat16):
        return x.astype(dtype)
    with np.errstate(over="ignore"):  # beyond float32's range is beyond bfloat16's: inf either way
        f = x.astype(np.float32)
    inexact = f.astype(np.float64) != x
    bits = f.view(np.uint32).copy()
    bits[inexact & (np.abs(f.astype(np.float64)) > np.abs(x))] -= 1  # one step toward zero: truncation
    bits[inexact] |= 1
    return bits.view(np.float32).astype(ml_dtypes.bfloat16)
