"""Read an image of any format Pillow knows into the model's 28x28 digit, or refuse it with one line.

An image of more than `MAX_PIXELS` is refused from its header, before any pixel is decoded (a
baseline JPEG, which its DCT decodes reduced, up to `MAX_JPEG_PIXELS`); while an image is read,
Pillow's own DecompressionBombWarning is an error (a scoped warnings filter: importing this
module changes nothing in Pillow or in the process's warning filters). A decoded image is
box-reduced to the working size in its own mode before anything is converted to float.

The commonest input, a small plain 8-bit grayscale PNG, takes `bnpipe.serve.png`'s fast path;
`load_digits` decodes a batch of them with one call into Pillow's decoder.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin

from bnpipe.errors import BnpipeError, one_line
from bnpipe.serve.gray import shrink, to_grayscale
from bnpipe.serve.png import SIGNATURE, plain_gray_rows, read_small, unfilter
from bnpipe.serve.preprocess import SIZE, BlankImageError, is_mnist_format, preprocess, work_factor

__all__ = ["MAX_JPEG_PIXELS", "MAX_PIXELS", "ImageError", "load_digit", "load_digits", "shrink", "to_grayscale"]

# 25 megapixels (a 6000x4000 camera photo) is ~100 MB decoded as RGBA: far more than a digit needs.
MAX_PIXELS = 25_000_000
# A baseline JPEG decodes at 1/8 scale: 200 MP (the largest phone sensors) become 3 MP of gray.
MAX_JPEG_PIXELS = 200_000_000

_NO_EXIF = frozenset({"PNG", "BMP", "GIF"})  # formats whose orientation is never in EXIF here
_JPEG_MAGIC = b"\xff\xd8\xff"


class ImageError(BnpipeError):
    """One input image cannot be used; ``name`` is the input's path, ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def declared_size(head: bytes) -> tuple[int, int] | None:
    """Return (width, height) from a PNG, GIF or BMP header, or None for other data.

    Pillow refuses to open an image whose header declares a zero side and says only that it
    cannot identify it; reading the header here lets the message say what is really wrong.
    """
    if head[:8] == SIGNATURE and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:2] == b"BM" and len(head) >= 26:
        width = int.from_bytes(head[18:22], "little", signed=True)
        return width, abs(int.from_bytes(head[22:26], "little", signed=True))  # negative height: top-down
    return None


def _reason_for_unidentified(fp: BinaryIO) -> str:
    """Say why Pillow could not identify an input: empty, zero-sized, or not an image."""
    fp.seek(0)
    head = fp.read(32)
    if not head:
        return "empty file"
    size = declared_size(head)
    if size is not None and min(size) <= 0:
        return f"image has zero size ({size[0]}x{size[1]})"
    return "not an image (Pillow cannot identify its format)"


def _identify(fp: BinaryIO) -> Image.Image:
    """Open ``fp`` as an image; a PNG or a JPEG goes straight to Pillow's reader for it.

    Nearly every digit image is a PNG, and for a 28x28 one `Image.open`'s search through the
    registered formats costs a fifth of the whole decode. A JPEG skips `Image.open` for another
    reason: Pillow's size limit, checked there, would refuse a phone photo that decodes reduced
    (`pixel_limit` is checked instead). Each reader is the one Image.open would pick (for a
    multi-picture JPEG, its first picture); a PNG it rejects is reported as Image.open's would
    be, and a JPEG it rejects is handed to Image.open.
    """
    head = fp.read(8)
    fp.seek(0)
    if head == SIGNATURE:
        try:
            return PngImagePlugin.PngImageFile(fp)
        except (SyntaxError, ValueError, OSError, EOFError, struct.error) as exc:
            raise Image.UnidentifiedImageError(str(exc)) from None
    if head[:3] == _JPEG_MAGIC:
        try:
            return JpegImagePlugin.JpegImageFile(fp)
        except Exception:  # noqa: BLE001 - Image.open says what is wrong, in its own words
            fp.seek(0)
    return Image.open(fp)


def jpeg_scale(width: int, height: int) -> int:
    """Return the DCT reduction (1, 2, 4 or 8 a side) to decode a JPEG of this size at.

    The largest that still leaves at least the working size (`work_factor`): the DCT does the
    first part of the reduction `shrink` would do, and no detail that the working size keeps is lost.
    """
    factor = work_factor(width, height)
    return next(s for s in (8, 4, 2, 1) if s <= factor)


def pixel_limit(im: Image.Image) -> int:
    """Return how many pixels an opened image may declare.

    A baseline JPEG decodes reduced by `jpeg_scale`, and only that reduced image is ever in
    memory (at most 3.2 MP past MAX_PIXELS): it may declare up to MAX_JPEG_PIXELS. A progressive
    JPEG buffers every DCT coefficient at full size, and other formats decode at full size:
    MAX_PIXELS.
    """
    return MAX_JPEG_PIXELS if im.format == "JPEG" and not im.info.get("progressive") else MAX_PIXELS


def open_image(fp: BinaryIO, name: str) -> Image.Image:
    """Open an image from an open binary file and check its header, decoding no pixels yet.

    Args:
        fp: The file, or a BytesIO of stdin; it stays the caller's to close.
        name: What to call the input in messages.

    Returns:
        The lazily opened image.

    Raises:
        ImageError: empty, not an image, zero-sized, or too large.
    """
    try:
        im = _identify(fp)
    except Image.UnidentifiedImageError:
        raise ImageError(name, _reason_for_unidentified(fp)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(name, f"image too large, refused before decoding ({one_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is a bad input
        raise ImageError(name, f"unreadable image header ({one_line(exc)})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(name, f"image has zero size ({w}x{h})")
    limit = pixel_limit(im)  # the only check for PNG and JPEG, which skip Image.open's
    if w * h > limit:
        raise ImageError(name, f"image too large, refused before decoding ({w}x{h} = {w * h} pixels > {limit})")
    return im


def open_source(source: str | bytes, name: str) -> BinaryIO:
    """Open a path (or wrap stdin's bytes) for reading.

    Raises:
        ImageError: the path is missing, a directory, or unreadable.
    """
    if isinstance(source, bytes):
        return io.BytesIO(source)
    try:
        return open(source, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise ImageError(name, "no such file or directory") from None
    except IsADirectoryError:
        raise ImageError(name, "is a directory") from None
    except OSError as exc:
        raise ImageError(name, f"cannot read ({exc.strerror or exc})") from None


def decode(im: Image.Image, name: str) -> Image.Image:
    """Decode the pixels of an opened image (the first frame of an animation), upright.

    Raises:
        ImageError: the data is truncated or corrupt.
    """
    if im.format == "JPEG":
        w, h = im.size
        s = jpeg_scale(w, h)
        # The DCT decodes straight to luma at 1/s scale (Pillow takes the largest of 8, 4, 2, 1 <= w // (w // s) = s).
        im.draft("L", (max(1, w // s), max(1, h // s)))
    try:
        im.load()
        if im.format not in _NO_EXIF:
            from PIL import ImageOps

            # A phone photo is stored sideways with an EXIF rotation; in place: no copy when upright.
            ImageOps.exif_transpose(im, in_place=True)
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError...
        kind = "truncated image" if "truncated" in str(exc) or isinstance(exc, EOFError) else "corrupt image data"
        raise ImageError(name, f"{kind} ({one_line(exc)})") from None
    return im


def read_gray(fp: BinaryIO, name: str) -> np.ndarray:
    """Open, decode and shrink an image, and return its gray levels (`to_grayscale`).

    Pillow's DecompressionBombWarning is an error here only, not in the rest of the process.

    Raises:
        ImageError: the input is not an image, too large, corrupt, or of a mode with no gray.
    """
    with warnings.catch_warnings():
        # Pillow warns (and errs at twice the size) past its own limit: here that refuses the file.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = decode(open_image(fp, name), name)
    try:
        return to_grayscale(shrink(im))
    except Exception as exc:  # noqa: BLE001 - e.g. ValueError: conversion from LAB to RGB not supported
        reason = "unsupported image mode" if isinstance(exc, ValueError) else "cannot convert to gray, image mode"
        raise ImageError(name, f"{reason} {im.mode} ({one_line(exc)})") from None


def finish(gray: np.ndarray, name: str) -> np.ndarray:
    """`preprocess` a gray image into the model's digit; its failures become ImageError."""
    try:
        return preprocess(gray)
    except BlankImageError as exc:
        raise ImageError(name, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - an image nobody foresaw must not stop the others
        raise ImageError(name, f"cannot preprocess the image ({one_line(exc)})") from None


def load_digits(sources: Sequence[str | bytes], names: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
    """Read a batch of inputs into the model's input digits, as `load_digit` reads each.

    Plain grayscale PNGs (`bnpipe.serve.png`) are read with one system call each and unfiltered
    together, and those that are 28x28 on a dark background pass through with one vectorized
    test; every other input takes Pillow's full path.

    Args:
        sources: File paths, or the bytes of images.
        names: What to call each input in messages.

    Returns:
        [M, 28, 28] uint8 for the M inputs that could be read, in order, and {index in
        ``sources``: reason} for the others.
    """
    out = np.empty((len(sources), SIZE, SIZE), np.uint8)
    errors: dict[int, str] = {}
    plain: dict[tuple[int, int], list[tuple[int, bytes]]] = {}  # (width, height) -> [(index, filtered rows)]
    for i, source in enumerate(sources):
        data = source if isinstance(source, bytes) else read_small(source)
        found = plain_gray_rows(data) if data is not None else None
        if found is not None:
            plain.setdefault(found[:2], []).append((i, found[2]))
            continue
        try:
            with open_source(source if data is None else data, names[i]) as fp:
                gray = read_gray(fp, names[i])  # the decoded image is freed here: only the reduced gray stays
            out[i] = finish(gray, names[i])
        except ImageError as exc:
            errors[i] = exc.reason
    for (width, height), members in plain.items():
        grays = unfilter(width, height, [rows for _, rows in members])  # [n, height, width]
        index = np.array([i for i, _ in members])
        passing = np.zeros(len(members), bool)
        if (width, height) == (SIZE, SIZE):
            passing = is_mnist_format(grays)
            out[index[passing]] = grays[passing]
        for i, gray in zip(index[~passing], grays[~passing]):
            try:
                out[i] = finish(gray, names[i])
            except ImageError as exc:
                errors[i] = exc.reason
    if errors:
        out = out[[i for i in range(len(sources)) if i not in errors]]
    return out, errors


def load_digit(source: str | bytes, name: str) -> np.ndarray:
    """Read one input into the model's input digit.

    Args:
        source: A file path, or the bytes of an image (stdin, an upload).
        name: What to call the input in messages.

    Returns:
        [28, 28] uint8, light digit on dark, as `bnpipe.serve.preprocess.preprocess` makes it.

    Raises:
        ImageError: the input cannot be used; its message names it.
    """
    pixels, errors = load_digits([source], [name])
    if errors:
        raise ImageError(name, errors[0])
    return pixels[0]
