"""Preprocessing as pure functions: centering, standardization, scaling into [-1, 1].

Features lie along every axis but ``dims``: for tabular data [N, D] reduce over ``dims=(0,)``,
for images [N, C, H, W] reduce over ``dims=(0, 2, 3)`` to get one statistic per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bnpipe.train.config import NORMALIZE_MODES

Dims = Sequence[int]


def _broadcast(stat: torch.Tensor | Sequence[float], x: torch.Tensor, dims: Dims) -> torch.Tensor:
    """Shape a per-feature statistic so that it broadcasts against ``x`` (1 on each reduced axis)."""
    stat = torch.as_tensor(stat, dtype=x.dtype, device=x.device)
    if stat.dim() == 0:  # one number for every feature
        return stat
    shape = [1 if d in {d % x.dim() for d in dims} else s for d, s in enumerate(x.shape)]
    return stat.reshape(shape)


def feature_mean(x: torch.Tensor, dims: Dims = (0,)) -> torch.Tensor:
    """Mean of each feature, reduced over ``dims``."""
    return x.mean(dim=tuple(dims))


def feature_std(x: torch.Tensor, dims: Dims = (0,)) -> torch.Tensor:
    """Population standard deviation of each feature, reduced over ``dims``."""
    return x.std(dim=tuple(dims), correction=0)


def center(x: torch.Tensor, mean: torch.Tensor | Sequence[float] | None = None, dims: Dims = (0,)) -> torch.Tensor:
    """Subtract each feature's mean.

    Args:
        x: Data, features along the axes not in ``dims``.
        mean: Per-feature means; computed from ``x`` when None.
        dims: Axes that index samples (reduced over).

    Returns:
        ``x - mean``, so each feature has mean zero (exactly, when ``mean`` came from ``x``).
    """
    mean = feature_mean(x, dims) if mean is None else mean
    return x - _broadcast(mean, x, dims)


def standardize(
    x: torch.Tensor,
    mean: torch.Tensor | Sequence[float] | None = None,
    std: torch.Tensor | Sequence[float] | None = None,
    dims: Dims = (0,),
) -> torch.Tensor:
    """Center each feature, then divide it by its standard deviation.

    Args:
        x: Data, features along the axes not in ``dims``.
        mean: Per-feature means; computed from ``x`` when None.
        std: Per-feature standard deviations; computed from ``x`` when None.
        dims: Axes that index samples.

    Returns:
        ``(x - mean) / std``: zero mean and unit variance per feature when the stats came from ``x``.
    """
    std = feature_std(x, dims) if std is None else std
    return center(x, mean, dims) / _broadcast(std, x, dims)


def scale_to_unit_range(
    x: torch.Tensor,
    lo: torch.Tensor | Sequence[float] | float | None = None,
    hi: torch.Tensor | Sequence[float] | float | None = None,
    dims: Dims = (0,),
) -> torch.Tensor:
    """Map each feature linearly from [lo, hi] onto [-1, 1].

    Args:
        x: Data, features along the axes not in ``dims``.
        lo: Per-feature minimum; ``x``'s own minimum when None.
        hi: Per-feature maximum; ``x``'s own maximum when None.
        dims: Axes that index samples.

    Returns:
        ``2 (x - lo) / (hi - lo) - 1``. For pixels with lo=0, hi=255 this is (x/255 - 0.5)/0.5.
    """
    lo = x.amin(dim=tuple(dims)) if lo is None else lo
    hi = x.amax(dim=tuple(dims)) if hi is None else hi
    lo_b, hi_b = _broadcast(lo, x, dims), _broadcast(hi, x, dims)
    return 2 * (x - lo_b) / (hi_b - lo_b) - 1


IMAGE_DIMS = (0, 2, 3)  # [N, C, H, W]: one statistic per channel


@dataclass(frozen=True)
class Normalization:
    """How raw uint8 pixels become network inputs: ``(x/255 - mean) / std`` per channel.

    Stored in the checkpoint and in the ONNX metadata, so every stage applies the same numbers.
    """

    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_mode(cls, mode: str, pixels: torch.Tensor) -> Normalization:
        """Build the normalization for ``mode`` ("half" or "dataset").

        Args:
            mode: "half" is the tutorial's (x/255 - 0.5)/0.5; "dataset" uses the per-channel
                mean and std of ``pixels``.
            pixels: Training images, uint8 [N, C, H, W]; only read for "dataset".
        """
        if mode == "half":
            channels = pixels.shape[1]
            return cls(mode, (0.5,) * channels, (0.5,) * channels)
        if mode == "dataset":
            x = pixels.to(torch.float64) / 255.0
            return cls(mode, tuple(feature_mean(x, IMAGE_DIMS).tolist()), tuple(feature_std(x, IMAGE_DIMS).tolist()))
        raise ValueError(f"unknown normalization mode {mode!r}; expected one of {NORMALIZE_MODES}")

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalize a whole batch of uint8 pixels [N, C, H, W] into float32."""
        return standardize(pixels.to(torch.float32) / 255.0, self.mean, self.std, IMAGE_DIMS)

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly form, for the checkpoint and the ONNX metadata."""
        return {"mode": self.mode, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Normalization:
        """Inverse of :meth:`to_dict`."""
        return cls(str(d["mode"]), tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))  # type: ignore[union-attr]
