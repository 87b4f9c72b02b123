"""MNIST-style normalization of a grayscale digit image: pure functions over numpy arrays.

MNIST was made by scaling each NIST digit to fit a 20x20 box (keeping its aspect ratio, with
anti-aliasing) and placing it in a 28x28 field so that its centre of mass sits at the centre
(index coordinates (14, 14): the mean over the MNIST test set is (13.99, 14.01)). `preprocess`
does the same to any image, after turning it light-on-dark and separating ink from paper.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 28  # side of the model's input
FIT = 20  # the digit's longer side after scaling, as in MNIST
CENTRE = 14.0  # where MNIST puts the centre of mass, in index coordinates
WORK_SIZE = 1024  # larger images are box-reduced first: the result is 20 px, detail beyond this is noise
BORDER_FRACTION = 0.05  # the ring that samples the background is 5% of the shorter side (at least 1 px)
GRID = 4  # the illumination model is fitted to GRID x GRID blocks of the image
TRIM = 0.002  # ink mass ignored at each side of the bounding box, so a speck of dust cannot widen it

# Flat indices of the 108 border pixels of a 28x28 image: the fast path tests them with one gather.
_EDGE = np.zeros((SIZE, SIZE), dtype=bool)
_EDGE[[0, -1], :] = True
_EDGE[:, [0, -1]] = True
_EDGE_INDEX = np.flatnonzero(_EDGE)


class BlankImageError(ValueError):
    """The image holds no ink that stands out from its background."""


def border_ring(gray: np.ndarray) -> np.ndarray:
    """Return the pixels of the outer ring of ``gray`` ([H, W]) as a 1-D array.

    The ring is ``BORDER_FRACTION`` of the shorter side wide (at least one pixel); a digit is
    drawn or photographed with a margin, so the ring samples the background.
    """
    h, w = gray.shape
    k = max(1, round(BORDER_FRACTION * min(h, w)))
    if 2 * k >= min(h, w):
        return gray.ravel()
    return np.concatenate([gray[:k].ravel(), gray[-k:].ravel(), gray[k:-k, :k].ravel(), gray[k:-k, -k:].ravel()])


def background_is_light(gray: np.ndarray) -> bool:
    """Return whether the border of ``gray`` is nearer the image's lightest level than its darkest.

    Relative to the image's own range, not to 128: a 16-bit scan that uses only the bottom of
    its range still has a light page and dark ink.
    """
    lo, hi = float(gray.min()), float(gray.max())
    return bool(np.median(border_ring(gray)) > (lo + hi) / 2)


def composite_alpha(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten a grayscale image with alpha ([H, W] each; gray 0..255, alpha 0..1) onto a background.

    A mostly transparent image is strokes on a transparent canvas: the visible pixels are the
    ink, so the background is chosen to contrast with them (white under dark strokes, black
    under light ones). A mostly opaque image is a canvas with transparent padding: the padding
    continues the canvas, so it takes the canvas's (light or dark) colour.

    Returns:
        [H, W] float32, 0..255.
    """
    alpha = alpha.astype(np.float32)
    coverage = float(alpha.mean())
    visible = float((gray * alpha).sum() / alpha.sum()) if coverage > 0 else 0.0
    light_visible = visible > 127.5
    light_background = light_visible if coverage >= 0.5 else not light_visible
    background = 255.0 if light_background else 0.0
    return (gray * alpha + background * (1.0 - alpha)).astype(np.float32)


def to_uint8(gray: np.ndarray) -> np.ndarray:
    """Round a 0..255 array to uint8 (a uint8 array is returned as it is)."""
    if gray.dtype == np.uint8:
        return gray
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def preprocess(gray: np.ndarray) -> np.ndarray:
    """Turn a grayscale image into the model's 28x28 light-on-dark digit.

    A 28x28 image whose background is already dark is MNIST's own format and is returned as
    it is, bit for bit (only rounded to uint8 if it came as 16-bit or float). Any other image
    goes through `mnist_normalize`.

    Args:
        gray: [H, W] uint8, or float32 on the 0..255 scale (16-bit and alpha images).

    Returns:
        [28, 28] uint8.

    Raises:
        BlankImageError: the image holds no ink.
    """
    if gray.shape == (SIZE, SIZE):
        g8 = to_uint8(gray)
        if is_mnist_format(g8[None])[0]:
            return g8
    return mnist_normalize(gray)


def is_mnist_format(digits: np.ndarray) -> np.ndarray:
    """Return which of ``digits`` ([N, 28, 28] uint8) are on a dark background, as MNIST's are.

    Light-background test by majority of the 108 edge pixels (the median, without a sort).

    Returns:
        [N] bool.
    """
    edges = digits.reshape(len(digits), SIZE * SIZE)[:, _EDGE_INDEX]  # [N, 108]
    return np.count_nonzero(edges > 127, axis=1) * 2 <= _EDGE_INDEX.size


def work_factor(width: int, height: int) -> int:
    """Return the integer box-reduction factor that brings the longer side to at most WORK_SIZE (1: none)."""
    return max(1, -(-max(width, height) // WORK_SIZE))  # ceil


def reduce_to_work_size(gray: np.ndarray) -> np.ndarray:
    """Box-reduce ``gray`` ([H, W]) by `work_factor` so its longer side is at most WORK_SIZE."""
    factor = work_factor(gray.shape[1], gray.shape[0])
    if factor == 1:
        return gray.astype(np.float32)
    return np.asarray(Image.fromarray(gray.astype(np.float32), mode="F").reduce(factor))


def illumination(gray: np.ndarray) -> np.ndarray:
    """Estimate the background level of a dark-background image ([H, W]) as a fitted plane.

    Each of GRID x GRID blocks gives its 25th percentile (paper, unless ink covers most of the
    block); a plane a + b*y + c*x is fitted to those by least squares, then refitted without
    the blocks that sit well above it (ink-covered ones). A plane follows the gradient of a lamp
    or a shadow across a photographed page without following the strokes.

    Returns:
        [H, W] float32, the estimated background.
    """
    h, w = gray.shape
    ys = np.linspace(0, h, GRID + 1).astype(int)
    xs = np.linspace(0, w, GRID + 1).astype(int)
    rows, levels = [], []
    for i in range(GRID):
        for j in range(GRID):
            block = gray[ys[i] : max(ys[i + 1], ys[i] + 1), xs[j] : max(xs[j + 1], xs[j] + 1)]
            # [3]: the design-matrix row (1, y, x) of the block's centre, in units of the image size
            rows.append((1.0, (ys[i] + ys[i + 1]) / (2 * h), (xs[j] + xs[j + 1]) / (2 * w)))
            levels.append(np.percentile(block, 25))
    design, target = np.asarray(rows), np.asarray(levels)
    keep = np.ones(len(target), dtype=bool)
    for _ in range(2):
        coef = np.linalg.lstsq(design[keep], target[keep], rcond=None)[0]
        residual = target - design @ coef
        spread = max(4.0, 3.0 * float(np.median(np.abs(residual[keep]))))
        keep = residual <= spread
        if keep.sum() < 3:  # too few to fit a plane: fall back to a constant level
            return np.full(gray.shape, float(np.median(target)), dtype=np.float32)
    yy = (np.arange(h, dtype=np.float32) + 0.5)[:, None] / h
    xx = (np.arange(w, dtype=np.float32) + 0.5)[None, :] / w
    plane = coef[0] + coef[1] * yy + coef[2] * xx
    # A plane's extremes lie at the corners, inside the border ring: clipping to the ring's range
    # costs a true lighting gradient nothing, and stops a bold, block-filling digit lifting it.
    ring = border_ring(gray)
    return np.clip(plane, float(ring.min()), float(np.percentile(ring, 90))).astype(np.float32)


def ink_bounds(mass: np.ndarray) -> tuple[int, int]:
    """Return [start, stop) of the span holding all but TRIM of ``mass`` (1-D, >= 0) at each end."""
    cum = np.cumsum(mass, dtype=np.float64)
    total = cum[-1]
    start = int(np.searchsorted(cum, TRIM * total, side="right"))
    stop = int(np.searchsorted(cum, (1.0 - TRIM) * total, side="left")) + 1
    return start, max(stop, start + 1)


def separate_ink(gray: np.ndarray) -> np.ndarray:
    """Turn an image into light ink on a black background, stretched to 0..255.

    Inverts a light-background image, subtracts the fitted `illumination`, and maps the ink so
    that paper noise (four robust standard deviations of the border) becomes 0 and the ink's
    high level becomes 255. The noise is never taken below one quantization step of the
    source: 1 for uint8, 1/257 for float input (16-bit images, whose faint contrasts are real).

    Args:
        gray: [H, W] uint8, or float32 on the 0..255 scale.

    Returns:
        [H, W] float32, 0..255, background exactly 0.

    Raises:
        BlankImageError: nothing stands out from the background.
    """
    step = 1.0 if gray.dtype == np.uint8 else 1.0 / 257.0
    gray = reduce_to_work_size(gray)
    if background_is_light(gray):
        gray = 255.0 - gray  # MNIST polarity: light digit on dark
    signal = np.clip(gray - illumination(gray), 0.0, None)
    ring = border_ring(signal)
    noise = max(1.4826 * float(np.median(np.abs(ring - np.median(ring)))), step)  # robust std of the paper
    floor = 4.0 * noise
    candidates = signal[signal > 3.0 * floor]
    if candidates.size == 0:
        raise BlankImageError("no digit found: the image is blank")
    peak = float(np.percentile(candidates, 95))  # the ink's level, robust to a few hot pixels
    return np.clip((signal - floor) / max(peak - floor, 1e-6), 0.0, 1.0) * np.float32(255.0)


def fit_and_centre(ink: np.ndarray) -> np.ndarray:
    """Crop ``ink`` ([H, W], 0..255, dark background) to its ink, fit it to 20x20, centre its mass.

    Returns:
        [28, 28] uint8.
    """
    top, bottom = ink_bounds(ink.sum(axis=1))
    left, right = ink_bounds(ink.sum(axis=0))
    crop = ink[top:bottom, left:right]
    h, w = crop.shape
    scale = FIT / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL order: (width, height)
    # LANCZOS on a float image: anti-aliased like MNIST's own scaling; its ringing is clipped.
    patch = np.clip(np.asarray(Image.fromarray(crop, mode="F").resize(size, Image.LANCZOS)), 0.0, 255.0)
    mass = patch.sum()
    ph, pw = patch.shape
    cy = float(patch.sum(axis=1) @ np.arange(ph)) / mass
    cx = float(patch.sum(axis=0) @ np.arange(pw)) / mass
    y0 = min(max(round(CENTRE - cy), 0), SIZE - ph)
    x0 = min(max(round(CENTRE - cx), 0), SIZE - pw)
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[y0 : y0 + ph, x0 : x0 + pw] = patch
    return to_uint8(out)


def mnist_normalize(gray: np.ndarray) -> np.ndarray:
    """Normalize any grayscale digit image the way MNIST was made.

    Args:
        gray: [H, W] uint8 or float32 on the 0..255 scale, either polarity.

    Returns:
        [28, 28] uint8, light digit on black, fitted to 20x20 and centred on its centre of mass.

    Raises:
        BlankImageError: the image holds no ink.
    """
    return fit_and_centre(separate_ink(gray))
