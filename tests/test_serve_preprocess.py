"""MNIST-style preprocessing (bnpipe.serve.preprocess): pure functions on arrays."""

from __future__ import annotations

import numpy as np
import pytest

from bnpipe.serve.preprocess import (
    BlankImageError,
    composite_alpha,
    illumination,
    ink_bounds,
    mnist_normalize,
    preprocess,
)
from tests.test_serve_support import stroke_digit


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    """A canonical 28x28 light-on-dark digit, as MNIST stores them (made by the normalizer)."""
    return mnist_normalize(stroke_digit(200, seed=1))


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    w = img.astype(np.float64)
    idx = np.arange(img.shape[0])
    return float(w.sum(1) @ idx / w.sum()), float(w.sum(0) @ idx / w.sum())


def nonzero_box(img: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def close(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean absolute difference on 0..255, correlation) of two 28x28 digits."""
    fa, fb = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.abs(fa - fb).mean()), float(np.corrcoef(fa, fb)[0, 1])


def test_mnist_format_passes_through_bit_exact(digit: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    noisy = digit.copy()
    noisy[digit == 0] = rng.integers(0, 30, size=int((digit == 0).sum()))  # dark but not black background
    for img in (digit, noisy):
        out = preprocess(img)
        assert out.dtype == np.uint8 and out.shape == (28, 28)
        assert np.array_equal(out, img)


def test_sixteen_bit_mnist_passes_through(digit: np.ndarray) -> None:
    # 16-bit gray arrives on the 0..255 scale as float (value * 257 / 257): still bit-exact
    assert np.array_equal(preprocess(digit.astype(np.float32) * 257 / 257), digit)


def test_light_background_28x28_is_normalized_not_passed(digit: np.ndarray) -> None:
    out = preprocess(255 - digit)
    assert not np.array_equal(out, 255 - digit)
    mad, corr = close(out, digit)
    assert mad < 2 and corr > 0.995


def test_normalized_digit_is_fitted_and_centred() -> None:
    canvas = np.full((300, 400), 255, np.uint8)
    canvas[20:120, 300:380] = stroke_digit(100, seed=2)[:, 10:90]  # small, off-centre, in a corner
    out = mnist_normalize(canvas)
    h, w = nonzero_box(out)
    assert max(h, w) in (20, 21, 22)  # 20 px box, plus LANCZOS's anti-aliased fringe
    cy, cx = centre_of_mass(out)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    assert out[0].max() == 0 and out[:, 0].max() == 0  # background is exactly black


@pytest.mark.parametrize("scale", [4, 3])
def test_large_black_on_white_matches_original(digit: np.ndarray, scale: int) -> None:
    big = 255 - np.kron(digit, np.ones((scale, scale), np.uint8))  # dark ink on white, 4x the size
    out = preprocess(big)
    mad, corr = close(out, digit)
    assert mad < 4 and corr > 0.99, (mad, corr)


def test_photo_with_uneven_lighting_and_noise(digit: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    ink = np.kron(digit, np.ones((6, 6), np.uint8)).astype(np.float32) / 255  # [168, 168], 1 = ink
    page = np.zeros((240, 240), np.float32)
    page[30:198, 40:208] = ink
    yy, xx = np.mgrid[0:240, 0:240] / 240.0
    paper = 120 + 90 * xx + 30 * yy  # a lamp on the right: paper from 120 to 240
    photo = paper * (1 - 0.8 * page) + rng.normal(0, 6, page.shape)  # ink reflects 20%, sensor noise
    out = preprocess(np.clip(photo, 0, 255).astype(np.uint8))
    mad, corr = close(out, digit)
    assert mad < 10 and corr > 0.98, (mad, corr)


def test_illumination_follows_a_gradient_not_the_ink() -> None:
    yy, xx = np.mgrid[0:100, 0:100].astype(np.float32)
    background = 10 + 0.5 * xx  # [100, 100], a plane
    img = background.copy()
    img[30:70, 45:55] += 150  # a bar of ink
    est = illumination(img)
    assert np.abs(est - background).max() < 3


def test_blank_image_is_refused() -> None:
    with pytest.raises(BlankImageError):
        mnist_normalize(np.full((50, 60), 200, np.uint8))
    noise = np.random.default_rng(0).normal(200, 3, (80, 80)).clip(0, 255).astype(np.uint8)
    with pytest.raises(BlankImageError):
        mnist_normalize(noise)


def test_huge_image_is_reduced_and_still_normalized(digit: np.ndarray) -> None:
    big = 255 - np.kron(digit, np.ones((80, 80), np.uint8))  # 2240 x 2240 > WORK_SIZE
    mad, corr = close(preprocess(big), digit)
    assert mad < 4 and corr > 0.99


def test_ink_bounds_ignore_a_speck() -> None:
    mass = np.zeros(100)
    mass[40:60] = 1000.0
    mass[2] = 1.0  # a speck of dust far away
    assert ink_bounds(mass) == (40, 60)


@pytest.mark.parametrize(("stroke", "canvas"), [(0, 255), (255, 0)], ids=["dark-on-white", "light-on-black"])
def test_composite_strokes_on_transparent_canvas_get_the_opposite_background(stroke: int, canvas: int) -> None:
    gray = np.full((10, 10), stroke, np.float32)  # the stroke colour everywhere, even where transparent
    alpha = np.zeros((10, 10), np.float32)
    alpha[4:6, 2:8] = 1.0
    out = composite_alpha(gray, alpha)
    assert out[0, 0] == canvas and out[4, 4] == stroke


def test_composite_transparent_padding_continues_the_canvas() -> None:
    gray = np.full((10, 10), 255, np.float32)  # a white canvas...
    gray[4:6, 3:7] = 0  # ...with a black digit...
    alpha = np.ones((10, 10), np.float32)
    alpha[:, 0] = 0  # ...and a transparent padding column
    out = composite_alpha(gray, alpha)
    assert out[5, 0] == 255 and out[4, 4] == 0
