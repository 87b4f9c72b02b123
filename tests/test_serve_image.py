"""Reading images (bnpipe.serve.image): every format and mode, and every kind of bad file."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bnpipe.serve import image as serve_image
from bnpipe.serve.image import ImageError, declared_size, load_digit, shrink, to_grayscale
from bnpipe.serve.predict import run
from bnpipe.serve.preprocess import mnist_normalize, preprocess
from tests.test_serve_preprocess import close
from tests.test_serve_support import (bmp_bytes_with_size, build_model, linear_reference, png_bytes_with_size,
                                     stroke_digit, write_bad_inputs)


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    """A canonical 28x28 light-on-dark digit."""
    return mnist_normalize(stroke_digit(200, seed=4))


@pytest.fixture(scope="module")
def paper(digit: np.ndarray) -> np.ndarray:
    """The digit drawn dark on white at 4x size: [112, 112] uint8."""
    return 255 - np.kron(digit, np.ones((4, 4), np.uint8))


def save(tmp_path: Path, im: Image.Image, name: str, **kwargs: object) -> str:
    path = tmp_path / name
    im.save(path, **kwargs)
    return str(path)


def assert_same_digit(out: np.ndarray, digit: np.ndarray, mad: float = 4.0) -> None:
    d, corr = close(out, digit)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert d < mad and corr > 0.99, (d, corr)


def test_mnist_png_is_bit_exact(tmp_path: Path, digit: np.ndarray) -> None:
    path = save(tmp_path, Image.fromarray(digit), "d.png")
    assert np.array_equal(load_digit(path, path), digit)


@pytest.mark.parametrize("fmt,ext,kwargs", [("PNG", "png", {}), ("BMP", "bmp", {}), ("TIFF", "tif", {}),
                                            ("WEBP", "webp", {"lossless": True}), ("GIF", "gif", {}),
                                            ("JPEG", "jpg", {"quality": 95})])
def test_formats_rgb(tmp_path: Path, digit: np.ndarray, paper: np.ndarray, fmt: str, ext: str, kwargs: dict) -> None:
    rgb = Image.fromarray(np.stack([paper] * 3, axis=-1))
    path = save(tmp_path, rgb, f"d.{ext}", format=fmt, **kwargs)
    assert_same_digit(load_digit(path, path), digit, mad=5.0 if fmt == "JPEG" else 4.0)


def test_rgba_on_transparent_canvas(tmp_path: Path, digit: np.ndarray, paper: np.ndarray) -> None:
    ink = 255 - paper  # alpha = ink: black strokes on a fully transparent canvas
    rgba = np.zeros((112, 112, 4), np.uint8)
    rgba[..., 3] = ink
    path = save(tmp_path, Image.fromarray(rgba, "RGBA"), "d.png")
    assert_same_digit(load_digit(path, path), digit)


def test_sixteen_bit(tmp_path: Path, digit: np.ndarray, paper: np.ndarray) -> None:
    im = Image.fromarray(paper.astype(np.uint16) * 257)  # full 16-bit range
    assert im.mode == "I;16"
    path = save(tmp_path, im, "d.png")
    assert Image.open(path).mode in ("I;16", "I")
    assert_same_digit(load_digit(path, path), digit)


def test_sixteen_bit_low_range_keeps_its_precision(tmp_path: Path, digit: np.ndarray, paper: np.ndarray) -> None:
    # A 16-bit scan using only 0..1000: 8 bits would keep 4 gray levels; float keeps them all.
    im = Image.fromarray((paper.astype(np.float64) / 255 * 1000).astype(np.uint16))
    path = save(tmp_path, im, "low.tif")
    assert_same_digit(load_digit(path, path), digit)


def test_palette_with_transparency(tmp_path: Path, digit: np.ndarray, paper: np.ndarray) -> None:
    # Index 0 = transparent, index 1 = black ink: a digit on a transparent palette canvas.
    idx = (paper < 128).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([0, 0, 0] * 256)
    path = save(tmp_path, im, "p.png", transparency=0)
    assert Image.open(path).mode == "P"
    d, corr = close(load_digit(path, path), digit)
    assert corr > 0.95, corr  # binary strokes: only the anti-aliasing differs


def test_gif_first_frame(tmp_path: Path, digit: np.ndarray, paper: np.ndarray) -> None:
    first = Image.fromarray(paper).convert("P")
    other = Image.fromarray(np.full_like(paper, 255)).convert("P")
    path = str(tmp_path / "anim.gif")
    first.save(path, save_all=True, append_images=[other, other])
    assert_same_digit(load_digit(path, path), digit)


def test_exif_rotation_is_applied(tmp_path: Path, digit: np.ndarray, paper: np.ndarray) -> None:
    im = Image.fromarray(np.rot90(paper, k=-1).copy())  # stored turned 90 deg clockwise...
    exif = Image.Exif()
    exif[0x0112] = 8  # ...and tagged "rotate 90 CCW to view" as a phone does
    path = save(tmp_path, im, "phone.jpg", quality=95, exif=exif)
    assert_same_digit(load_digit(path, path), digit, mad=5.0)


def test_stdin_bytes(digit: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, format="PNG")
    assert np.array_equal(load_digit(buf.getvalue(), "-"), digit)
    with pytest.raises(ImageError, match="^-: empty file$"):
        load_digit(b"", "-")


def test_to_grayscale_modes() -> None:
    assert to_grayscale(Image.new("L", (3, 2), 7)).dtype == np.uint8
    assert (to_grayscale(Image.new("RGB", (3, 2), (90, 90, 90))) == 90).all()  # gray RGB keeps its value
    assert to_grayscale(Image.new("1", (3, 2), 1)).max() == 255
    wide = to_grayscale(Image.new("I;16", (3, 2), 65535))
    assert wide.dtype == np.float32 and np.allclose(wide, 255.0)
    assert np.allclose(to_grayscale(Image.new("F", (3, 2), 0.5)), 127.5)


@pytest.mark.parametrize("name", ["empty.png", "notes.png", "truncated.png", "zero.png", "bomb.png", "bomb.bmp"])
def test_bad_files(tmp_path: Path, name: str) -> None:
    expected = write_bad_inputs(tmp_path)
    path = str(tmp_path / name)
    with pytest.raises(ImageError) as info:
        load_digit(path, path)
    assert info.value.name == path and expected[name] in info.value.reason
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_digit(str(tmp_path / "nope.png"), "nope.png")


def test_blank_image_is_an_error(tmp_path: Path) -> None:
    path = save(tmp_path, Image.new("L", (64, 64), 255), "white.png")
    with pytest.raises(ImageError, match="blank"):
        load_digit(path, path)


def test_bomb_refused_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # The PNG fast path skips Image.open and its check: the header check alone must refuse it.
    # Decoding must never start (load() would need gigabytes here).
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageError, match="too large"):
        load_digit(png_bytes_with_size(60_000, 60_000), "-")  # 3.6e9 px
    limit = serve_image.MAX_PIXELS
    with pytest.raises(ImageError, match=f"too large, refused before decoding .* pixels > {limit}"):
        load_digit(png_bytes_with_size(limit // 5000 + 1, 5000), "-")  # just past the limit
    with pytest.raises(ImageError, match="too large"):
        load_digit(bmp_bytes_with_size(limit // 5000 + 1, 5000), "-")  # the same through Image.open


def test_pillow_bomb_warning_is_an_error_only_while_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past Pillow's own limit its warning refuses the file, whatever the process's filters say."""
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    data = bmp_bytes_with_size(10_000, 10_000)  # 1e8 px: past Pillow's warning limit, under its error limit
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a process that shows every warning
        with pytest.raises(ImageError, match="too large.*decompression bomb"):
            load_digit(data, "-")
        assert caught == []  # refused with one line: no warning printed besides it
        Image.open(io.BytesIO(data))  # outside load_digit, Pillow behaves as it always does
    assert [w.category for w in caught] == [Image.DecompressionBombWarning]


def test_unconvertible_mode_is_an_image_error(tmp_path: Path) -> None:
    path = save(tmp_path, Image.new("RGB", (40, 40)).convert("LAB"), "lab.tif")
    assert Image.open(path).mode == "LAB"
    with pytest.raises(ImageError) as info:
        load_digit(path, path)
    assert info.value.reason.startswith("unsupported image mode LAB (")
    assert "\n" not in str(info.value)


def test_big_image_is_reduced_before_any_float_copy(digit: np.ndarray) -> None:
    """A 16-megapixel RGBA image: numpy never holds a full-size float32 channel (64 MB).

    tracemalloc sees numpy's buffers (not Pillow's): float32 copies at full size would peak at
    several times 64 MB; reduced to the working size first, they stay a few MB each.
    """
    ink = np.kron(digit, np.ones((143, 143), np.uint8))  # [4004, 4004]: strokes on a transparent canvas
    rgba = np.zeros((*ink.shape, 4), np.uint8)
    rgba[..., 3] = ink
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    del ink, rgba
    tracemalloc.start()
    try:
        out = load_digit(buf.getvalue(), "-")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4004 * 4004 * 4, f"{peak / 1e6:.0f} MB"
    assert_same_digit(out, digit)


@pytest.mark.parametrize("mode", ["RGB", "LA", "I;16", "P", "1", "F"])
def test_shrink_keeps_the_digit_in_every_mode(digit: np.ndarray, paper: np.ndarray, mode: str) -> None:
    big = np.kron(paper, np.ones((10, 10), np.uint8))  # [1120, 1120]: reduced by 2
    if mode == "I;16":
        im = Image.fromarray(big.astype(np.uint16) * 257)
    elif mode == "LA":
        im = Image.fromarray(np.stack([np.zeros_like(big), 255 - big], axis=-1), "LA")  # ink as alpha
    elif mode == "P":
        im = Image.fromarray((big < 128).astype(np.uint8), "P")
        im.putpalette([0, 0, 0] * 256)
        im.info["transparency"] = 0
    else:
        im = Image.fromarray(big).convert(mode)
    small = shrink(im)
    assert small.size == (560, 560)
    assert_same_digit(preprocess(to_grayscale(small)), digit, mad=8.0 if mode in ("P", "1") else 4.0)
    assert shrink(small) is small  # within the working size: untouched


def test_bomb_through_image_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-PNG bomb meets Pillow's own check in Image.open (the hard 2x-limit error here)."""
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageError, match="too large.*decompression bomb"):
        load_digit(bmp_bytes_with_size(60_000, 60_000), "-")


def test_declared_size() -> None:
    assert declared_size(png_bytes_with_size(0, 9)[:32]) == (0, 9)
    assert declared_size(b"GIF89a\x05\x00\x00\x00") == (5, 0)
    assert declared_size(b"hello world") is None


def phone_photo(digit_paper: np.ndarray, size: tuple[int, int] = (8000, 6000), **kwargs: object) -> bytes:
    """A JPEG of ``size`` (48 MP): gray paper with the digit drawn ~2000 px tall in the middle."""
    photo = Image.new("L", size, 235)
    ink = Image.fromarray(digit_paper).resize((2000, 2000), Image.BILINEAR).point(lambda v: v * 235 // 255)
    photo.paste(ink, ((size[0] - 2000) // 2, (size[1] - 2000) // 2))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=85, **kwargs)
    return buf.getvalue()


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` with the size in its start-of-frame header replaced: a header-only giant."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):  # baseline, progressive
        at = data.find(marker)
        if at > 0:
            return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]
    raise AssertionError("no start of frame")


def test_48_megapixel_phone_photo_is_accepted(tmp_path: Path, digit: np.ndarray, paper: np.ndarray) -> None:
    """Decoded at 1/8 scale by the DCT (1000x750): the right digit, and the right label from `run`."""
    data = phone_photo(paper)
    assert Image.open(io.BytesIO(data)).size == (8000, 6000) and 8000 * 6000 > serve_image.MAX_PIXELS
    assert_same_digit(load_digit(data, "-"), digit, mad=6.0)
    model = build_model(tmp_path / "m.onnx")
    (tmp_path / "photo.jpg").write_bytes(data)
    out = io.StringIO()
    assert run([str(tmp_path / "photo.jpg")], str(model), "cpu", stdout=out, stderr=io.StringIO()) == 0
    want = str(int(linear_reference(digit[None]).argmax()))
    assert out.getvalue().split("\t")[1] == want
    # 108 MP, past Pillow's own limit: not refused for its size (it is truncated: the header is all it has).
    with pytest.raises(ImageError, match="^-: truncated image"):
        load_digit(with_jpeg_size(data[:20_000], 12_000, 9000), "-")


def test_jpeg_size_limits(monkeypatch: pytest.MonkeyPatch, paper: np.ndarray) -> None:
    """Past MAX_JPEG_PIXELS, or progressive past MAX_PIXELS (its coefficients are buffered at full size): refused unread."""
    small, progressive = io.BytesIO(), io.BytesIO()
    Image.fromarray(paper).save(small, format="JPEG")
    Image.fromarray(paper).save(progressive, format="JPEG", progressive=True)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a refused image"))
    with pytest.raises(ImageError, match=r"^-: image too large, refused before decoding \(20000x15000 = 300000000 "
                                         r"pixels > 200000000\)$"):
        load_digit(with_jpeg_size(small.getvalue(), 20_000, 15_000), "-")
    with pytest.raises(ImageError, match=r"^-: image too large, refused before decoding \(8000x6000 = 48000000 "
                                         r"pixels > 25000000\)$"):
        load_digit(with_jpeg_size(progressive.getvalue(), 8000, 6000), "-")


def test_jpeg_scale() -> None:
    assert [serve_image.jpeg_scale(w, h) for w, h in [(28, 28), (1024, 1), (1025, 900), (3000, 2000), (4096, 3072),
                                                      (8000, 6000), (16384, 12288)]] == [1, 1, 2, 2, 4, 8, 8]
