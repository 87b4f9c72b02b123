"""The fast path for plain grayscale PNGs (bnpipe.serve.png): exact pixels, and everything else left to Pillow."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bnpipe.serve import image as serve_image
from bnpipe.serve.image import load_digit, load_digits
from bnpipe.serve.png import MAX_BYTES, plain_gray_rows, read_small, unfilter
from tests.test_serve_support import stroke_digit, write_bad_inputs


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def filtered(pixels: np.ndarray, filters: list[int]) -> bytes:
    """PNG-filter each row of ``pixels`` [H, W] uint8 with the given filter type (0..4), as an encoder does."""
    img = pixels.astype(np.int32)
    out = []
    for y, kind in enumerate(filters):
        x = img[y]
        b = img[y - 1] if y else np.zeros_like(x)  # the row above: zeros for the first row
        a = np.concatenate([[0], x[:-1]])  # the pixel to the left
        c = np.concatenate([[0], b[:-1]])
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        predictor = [np.zeros_like(x), a, b, (a + b) // 2, paeth][kind % 5]  # 5: an invalid type byte
        out.append(bytes([kind]) + ((x - predictor) % 256).astype(np.uint8).tobytes())
    return b"".join(out)


def png(pixels: np.ndarray, filters: list[int] | None = None, ihdr_tail: bytes = b"\x08\x00\x00\x00\x00",
        extra: bytes = b"", after: bytes = b"", idat_parts: int = 1) -> bytes:
    """A PNG written by hand: chosen row filters, optional extra chunks before IDAT or bytes after IEND."""
    h, w = pixels.shape
    stream = zlib.compress(filtered(pixels, filters if filters is not None else [y % 5 for y in range(h)]))
    cuts = np.linspace(0, len(stream), idat_parts + 1).astype(int)
    idats = b"".join(chunk(b"IDAT", stream[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
    ihdr = chunk(b"IHDR", struct.pack(">II", w, h) + ihdr_tail)
    return b"\x89PNG\r\n\x1a\n" + ihdr + extra + idats + chunk(b"IEND", b"") + after


def pillow(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_every_filter_decodes_exactly_in_a_batch() -> None:
    """Filters 0..4 on every row position, first rows included, across the images of one batch."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(10)]
    files = [png(im, [(y + i) % 5 for y in range(28)]) for i, im in enumerate(images)]
    found = [plain_gray_rows(f) for f in files]
    assert all(f is not None and f[:2] == (28, 28) for f in found)
    stacked = unfilter(28, 28, [f[2] for f in found])  # type: ignore[index]
    assert stacked.shape == (10, 28, 28) and stacked.dtype == np.uint8
    for im, f, got in zip(images, files, stacked):
        assert np.array_equal(got, im) and np.array_equal(got, pillow(f))


@pytest.mark.parametrize("size", [(1, 1), (300, 5), (5, 300), (256, 256)])
def test_sizes_and_split_idat(size: tuple[int, int]) -> None:
    im = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    data = png(im, idat_parts=3)
    found = plain_gray_rows(data)
    assert found is not None
    assert np.array_equal(unfilter(size[1], size[0], [found[2]])[0], im)


def test_pillows_own_files() -> None:
    digit = stroke_digit(64)
    for kwargs in ({}, {"optimize": True}, {"compress_level": 0}, {"compress_level": 9}):
        buf = io.BytesIO()
        Image.fromarray(digit).save(buf, format="PNG", **kwargs)
        found = plain_gray_rows(buf.getvalue())
        assert found is not None and np.array_equal(unfilter(64, 64, [found[2]])[0], digit)


def unusual() -> dict[str, bytes]:
    """Files the fast path must leave to Pillow (some of them fine images, some broken)."""
    im = 255 - stroke_digit(28, seed=2)  # a dark-background digit: Pillow's path passes it through as well
    good = png(im)
    rgb = io.BytesIO()
    Image.fromarray(np.stack([im] * 3, -1)).save(rgb, format="PNG")
    bad_crc = bytearray(good)
    bad_crc[30] ^= 1
    return {
        "rgb": rgb.getvalue(),
        "16-bit": png(im, ihdr_tail=b"\x10\x00\x00\x00\x00"),
        "interlaced": png(im, ihdr_tail=b"\x08\x00\x00\x00\x01"),
        "transparency": png(im, extra=chunk(b"tRNS", b"\x00\x00")),
        "text": png(im, extra=chunk(b"tEXt", b"k\x00v")),
        "after IEND": png(im, after=b"junk"),
        "bad IHDR checksum": bytes(bad_crc),
        "filter 5": png(im, [5] + [0] * 27),
        "short": png(im[:27]).replace(struct.pack(">II", 28, 27), struct.pack(">II", 28, 28)),
        "truncated": good[: len(good) - 20],
        "too large": png(np.zeros((257, 256), np.uint8)),
        "not png": b"GIF89a" + bytes(20),
    }


@pytest.mark.parametrize("kind", list(unusual()))
def test_unusual_files_take_the_full_path(kind: str) -> None:
    assert plain_gray_rows(unusual()[kind]) is None


def test_read_small(tmp_path: Path) -> None:
    (tmp_path / "small").write_bytes(b"abc")
    (tmp_path / "big").write_bytes(bytes(MAX_BYTES))
    assert read_small(str(tmp_path / "small")) == b"abc"
    assert read_small(str(tmp_path / "big")) is None  # too large for one read: the full path reads it
    assert read_small(str(tmp_path)) is None and read_small(str(tmp_path / "nope")) is None


def test_fast_path_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pixels and errors from load_digits equal those with the fast path switched off, input by input."""
    rng = np.random.default_rng(3)
    dark = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    dark[[0, -1]] = 0
    sources: list[str | bytes] = [png(dark), png(255 - stroke_digit(28)), png(stroke_digit(64)),
                                  png(np.full((28, 28), 255, np.uint8)), *unusual().values()]
    bad = write_bad_inputs(tmp_path)
    sources += [str(tmp_path / name) for name in bad] + [str(tmp_path), str(tmp_path / "missing.png")]
    for i, data in enumerate(sources[:4]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(data)  # type: ignore[arg-type]
        sources.append(str(path))
    names = [f"in{i}" for i in range(len(sources))]
    fast = load_digits(sources, names)
    monkeypatch.setattr(serve_image, "plain_gray_rows", lambda data: None)
    full = load_digits(sources, names)
    assert fast[1] == full[1] and np.array_equal(fast[0], full[0])
    assert len(fast[0]) + len(fast[1]) == len(sources) and len(fast[0]) == 11  # 5 unusual files Pillow reads
    assert np.array_equal(fast[0][0], dark)  # MNIST format: bit for bit
    with pytest.raises(serve_image.ImageError, match="^in: no digit found"):
        load_digit(sources[3], "in")
