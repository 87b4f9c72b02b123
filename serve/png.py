"""A fast path for the commonest input: a small, plain 8-bit grayscale PNG (what MNIST tools write).

Such a file is read with one system call, its chunks are walked here, and Pillow's own PNG
decoder (its "zip" codec, the C code `Image.open` would use) unfilters the rows of a whole batch
of them in one call. Anything else, or anything unusual about the file, gives None, and the
caller takes Pillow's full path: that path alone decides what a bad file's error says, and the
fast path accepts only files whose pixels it is certain to decode exactly as Pillow would.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_BYTES = 65_536  # one read; a larger file takes the full path (and a bigger read would cost more)
MAX_PIXELS = 65_536  # 256x256: a batch of these stays a few MB
_PLAIN_IHDR = b"\x08\x00\x00\x00\x00"  # 8 bits, grayscale, deflate, adaptive filters, not interlaced
_CHUNK = struct.Struct(">I4s")  # length, type
_SIZE = struct.Struct(">II")  # width, height


def read_small(path: str) -> bytes | None:
    """Return the whole file at ``path`` when it holds under MAX_BYTES, else None (also when unreadable).

    One open, one read, one close: Python's buffered file object would cost twice as much.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, MAX_BYTES)
    except OSError:  # a directory, an I/O error: the full path says which
        return None
    finally:
        os.close(fd)
    return data if len(data) < MAX_BYTES else None


def plain_gray_rows(data: bytes) -> tuple[int, int, bytes] | None:
    """Return (width, height, filtered rows) of a plain 8-bit grayscale PNG, or None for anything else.

    Plain means: a valid IHDR (checksum included) for 8-bit gray, not interlaced, at most
    MAX_PIXELS; then only IDAT chunks and IEND, nothing after; a zlib stream that ends and
    inflates to exactly ``height`` rows of a filter byte (0..4) and ``width`` pixels.
    """
    if data[:8] != SIGNATURE or data[8:16] != b"\x00\x00\x00\x0dIHDR" or data[24:29] != _PLAIN_IHDR:
        return None
    if zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        return None
    width, height = _SIZE.unpack_from(data, 16)
    if not (0 < width and 0 < height and width * height <= MAX_PIXELS):
        return None
    parts = []
    pos, end = 33, len(data)
    while True:
        if pos + 12 > end:
            return None
        length, kind = _CHUNK.unpack_from(data, pos)
        if kind == b"IEND":
            if pos + 12 != end:
                return None
            break
        if kind != b"IDAT" or pos + 12 + length > end:
            return None
        parts.append(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    stride = width + 1
    size = height * stride
    inflater = zlib.decompressobj()
    try:
        rows = inflater.decompress(parts[0] if len(parts) == 1 else b"".join(parts), size + 1)  # bounded: no bomb
    except (zlib.error, IndexError):  # corrupt data, or no IDAT at all
        return None
    if len(rows) != size or not inflater.eof or max(rows[::stride]) > 4:
        return None
    return width, height, rows


def unfilter(width: int, height: int, images: Sequence[bytes]) -> np.ndarray:
    """Turn the filtered rows of same-sized images (from `plain_gray_rows`) into pixels.

    The images are stacked into one tall image with an all-zero row after each, so that every
    image's first row sees the zero row that PNG's Up, Average and Paeth filters assume above
    it, and Pillow's decoder runs once for the whole batch.

    Returns:
        [len(images), height, width] uint8.
    """
    blank = bytes(width + 1)  # filter 0 (None), zero pixels
    tall = b"".join([part for rows in images for part in (rows, blank)])
    stacked = Image.frombytes("L", (width, len(images) * (height + 1)), zlib.compress(tall, 0), "zip", "L")
    return np.asarray(stacked).reshape(len(images), height + 1, width)[:, :height]
