"""An image's gray levels, in whatever mode Pillow decoded it: box-reduced first, then on the 0..255 scale."""

from __future__ import annotations

import numpy as np
from PIL import Image

from bnpipe.serve.preprocess import composite_alpha, work_factor

_WIDE = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # 16-bit (and 32-bit integer) gray
_ALPHA = frozenset({"LA", "RGBA", "RGBa"})
_INDEXED = frozenset({"1", "P", "PA"})  # pixel values that are not levels: averaging them means nothing


def _levels(im: Image.Image) -> Image.Image:
    """Turn a bilevel or palette image into levels that can be averaged: RGBA where it has transparency, else L."""
    return im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "L")


def shrink(im: Image.Image) -> Image.Image:
    """Box-reduce a decoded image by `work_factor`, in its own mode, before any float conversion.

    A 25-megapixel RGBA image makes float32 arrays of 100 MB each; reduced first, they are a few
    MB. `Image.reduce` premultiplies alpha, so transparent pixels' colour does not bleed into the
    ink. Palette and bilevel images become levels first, 16-bit ones 32-bit (reduce takes no I;16).

    Returns:
        ``im`` itself when it is within the working size, else the reduced image.
    """
    factor = work_factor(*im.size)
    if factor == 1:
        return im
    if im.mode in _INDEXED:
        im = _levels(im)
    elif im.mode in _WIDE:
        im = im.convert("I")  # exact: 0..65535 fits in int32
    return im.reduce(factor)


def to_grayscale(im: Image.Image) -> np.ndarray:
    """Return the image's gray levels on the 0..255 scale.

    8-bit images come back as uint8 via Pillow's exact ITU-R 601-2 luma (so a gray RGB pixel
    keeps its value). 16-bit images come back as float32 so that none of their precision is
    lost before contrast stretching; images with alpha are flattened by `composite_alpha`.

    Returns:
        [H, W] uint8 or float32.

    Raises:
        ValueError: Pillow cannot convert the image's mode (LAB, HSV) to gray.
    """
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode in _INDEXED:
        return to_grayscale(_levels(im))
    if mode in _WIDE:
        return np.clip(np.asarray(im).astype(np.float32), 0.0, 65535.0) / np.float32(257.0)
    if mode == "F":
        values = np.asarray(im, dtype=np.float32)
        scale = 255.0 if float(values.max(initial=0.0)) <= 1.0 else 1.0  # a 0..1 float image
        return np.clip(values * np.float32(scale), 0.0, 255.0)
    if mode in _ALPHA:
        la = np.asarray((im if mode == "LA" else im.convert("RGBA")).convert("LA"), dtype=np.float32)  # [H, W, 2]
        return composite_alpha(la[..., 0], la[..., 1] / np.float32(255.0))
    return np.asarray(im.convert("L"))
