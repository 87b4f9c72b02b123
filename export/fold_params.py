"""BatchNorm folding for tensors: :func:`bnpipe.export.fold_math.fold_bn_arrays` in float64, rounded once.

Used by :mod:`bnpipe.export.fold` for each layer it folds into.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bnpipe.export.fold_math import fold_bn_arrays, round_once


def fold_bn_params(
    weight: Tensor,
    bias: Tensor | None,
    bn_mean: Tensor,
    bn_var: Tensor,
    bn_eps: float,
    gamma: Tensor | None,
    beta: Tensor | None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold BatchNorm statistics into the weight and bias of the layer before it, for tensors.

    The arithmetic is :func:`bnpipe.export.fold_math.fold_bn_arrays` (float64; its docstring gives the
    layouts); the result is rounded once, to the weight's dtype (the bias's, when there is one).

    Args:
        weight, bias: The layer's, ``bias`` None for none. ConvTranspose (``transposed``): ``[C_in, C_out/g, *k]``.
        bn_mean, bn_var, bn_eps: The BatchNorm's running statistics ``[C_out]`` and its own epsilon.
        gamma, beta: Its affine parameters ``[C_out]``, or None when ``affine=False``.
        transposed, groups: The ConvTranspose layout and the layer's groups.

    Returns:
        The folded ``(weight, bias)``, in ``weight``'s device and shape.

    Raises:
        ValueError: If the BatchNorm's channel count does not match the layer's output channels.
    """
    def numpy64(t: Tensor | None) -> np.ndarray | None:
        return None if t is None else t.detach().to(torch.float64).cpu().numpy()

    w64, b64 = fold_bn_arrays(
        numpy64(weight), numpy64(bias), numpy64(bn_mean), numpy64(bn_var), bn_eps, numpy64(gamma), numpy64(beta),
        transposed=transposed, groups=groups,
    )  # fmt: skip
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return rounded(w64, weight.dtype).to(weight.device), rounded(b64, bias_dtype).to(weight.device)


def rounded(x64: np.ndarray, dtype: torch.dtype) -> Tensor:
    """float64 -> a tensor of ``dtype`` in one rounding (torch's own casts to half types go through float32)."""
    if not dtype.is_floating_point or dtype.itemsize == 8:
        return torch.from_numpy(x64).to(dtype)
    if dtype == torch.bfloat16:
        import ml_dtypes

        return torch.from_numpy(round_once(x64, ml_dtypes.bfloat16).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(round_once(x64, {torch.float32: np.float32, torch.float16: np.float16}[dtype]))
