"""Read an image of any format Pillow knows into the model's 28x28 digit, or refuse it with one line.

Importing this module sets Pillow's decompression-bomb limit to `MAX_PIXELS` and turns Pillow's
DecompressionBombWarning into an error, so an image of huge dimensions is refused from its
header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import struct
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, PngImagePlugin

from bnpipe.errors import BnpipeError
from bnpipe.serve.preprocess import BlankImageError, composite_alpha, preprocess

MAX_PIXELS = 50_000_000  # a 50-megapixel photo is ~200 MB as RGBA; larger is refused unread
DRAFT_SIZE = 512  # a large JPEG is decoded at 1/2..1/8 scale, keeping at least this many px a side
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

_WIDE = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # 16-bit (and 32-bit integer) gray
_ALPHA = frozenset({"LA", "PA", "RGBA", "RGBa"})
_NO_EXIF = frozenset({"PNG", "BMP", "GIF"})  # formats whose orientation is never in EXIF here
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
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
    """Open ``fp`` as an image; a PNG goes straight to Pillow's PNG reader.

    Nearly every digit image is a PNG, and for a 28x28 one `Image.open`'s search through the
    registered formats costs a fifth of the whole decode. The PNG reader is the one that
    Image.open would pick; a file it rejects is reported as Image.open's would be.
    """
    if fp.read(8) == _PNG_MAGIC:
        fp.seek(0)
        try:
            return PngImagePlugin.PngImageFile(fp)
        except (SyntaxError, ValueError, OSError, EOFError, struct.error) as exc:
            raise Image.UnidentifiedImageError(str(exc)) from None
    fp.seek(0)
    return Image.open(fp)


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
        raise ImageError(name, f"image too large, refused before decoding ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is a bad input
        raise ImageError(name, f"unreadable image header ({exc})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(name, f"image has zero size ({w}x{h})")
    if w * h > MAX_PIXELS:  # the PNG fast path's bomb check, and a guard if MAX_IMAGE_PIXELS was raised
        raise ImageError(name, f"image too large, refused before decoding ({w}x{h} = {w * h} pixels > {MAX_PIXELS})")
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
        # The DCT decodes straight to luma at a reduced scale: fast and light for big photos.
        im.draft("L", (min(w, DRAFT_SIZE), min(h, DRAFT_SIZE)))
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError...
        kind = "truncated image" if "truncated" in str(exc) or isinstance(exc, EOFError) else "corrupt image data"
        raise ImageError(name, f"{kind} ({exc})") from None
    if im.format not in _NO_EXIF:
        from PIL import ImageOps

        im = ImageOps.exif_transpose(im)  # a phone photo is stored sideways with an EXIF rotation
    return im


def to_grayscale(im: Image.Image) -> np.ndarray:
    """Return the image's gray levels on the 0..255 scale.

    8-bit images come back as uint8 via Pillow's exact ITU-R 601-2 luma (so a gray RGB pixel
    keeps its value). 16-bit images come back as float32 so that none of their precision is
    lost before contrast stretching; images with alpha are flattened by `composite_alpha`.

    Returns:
        [H, W] uint8 or float32.
    """
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode == "P":
        return to_grayscale(im.convert("RGBA" if "transparency" in im.info else "L"))
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


def load_digit(source: str | bytes, name: str) -> np.ndarray:
    """Read one input into the model's input digit.

    Args:
        source: A file path, or the bytes of an image (stdin).
        name: What to call the input in messages.

    Returns:
        [28, 28] uint8, light digit on dark, as `bnpipe.serve.preprocess.preprocess` makes it.

    Raises:
        ImageError: the input cannot be used; its message names it.
    """
    with open_source(source, name) as fp:
        gray = to_grayscale(decode(open_image(fp, name), name))
    try:
        return preprocess(gray)
    except BlankImageError as exc:
        raise ImageError(name, str(exc)) from None
