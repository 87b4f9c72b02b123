"""HTTP bodies: reading within a size limit, and gzip/deflate both ways (inflating without a bomb).

Pure functions except `read_body`, which only drains an ASGI request's stream.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import AsyncIterator

from bnpipe.serve.v2 import V2Error

ENCODINGS = ("gzip", "deflate")
MAX_GZIP_MEMBERS = 16  # concatenated gzip streams in one body (clients send one)
_WBITS = {"gzip": 31, "deflate": 15}  # 31: gzip wrapper; 15: zlib wrapper (HTTP's "deflate", RFC 9110)


def too_large(limit: int) -> V2Error:
    """The 413 for a body over ``limit`` bytes."""
    return V2Error(f"request body is larger than the limit of {limit} bytes (--max-body-bytes)", 413)


def decimal(raw: str) -> int | None:
    """``raw`` as a non-negative integer when it is plain ASCII digits (at most 18), else None.

    ``str.isdigit`` alone lets through digits ``int`` refuses (``"²"``) and lengths ``int`` will not
    convert: a client's header or query value must get a 400, not a 500.
    """
    raw = raw.strip(" \t")  # a header's surrounding whitespace is not part of its value (RFC 9110)
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else None


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """Read a request body of at most ``limit`` bytes.

    Args:
        chunks: The body as it arrives (Starlette's ``request.stream()``).
        content_length: The Content-Length header, or None (chunked transfer).
        limit: Bytes allowed.

    Raises:
        V2Error: 413 as soon as the declared length or the bytes read pass ``limit`` (the rest is
            not read), 400 for a Content-Length that is not a number.
    """
    if content_length is not None:
        declared = decimal(content_length)
        if declared is None:
            raise V2Error(f"Content-Length {content_length[:40]!r} is not a number")
        if declared > limit:
            raise too_large(limit)
    parts = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """Decode a body sent with ``Content-Encoding: gzip`` or ``deflate``, to at most ``limit`` bytes.

    At most ``limit + 1`` bytes are ever inflated: a small bomb costs no more than the limit.
    ``deflate`` is the zlib format, as HTTP defines it; raw deflate (what some clients send) is
    accepted too.

    Raises:
        V2Error: 413 when the data inflates past ``limit``; 400 for an unknown encoding or data
            that is not what the encoding says.
    """
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding not in _WBITS:
        raise V2Error(f"unsupported Content-Encoding '{encoding[:40]}': use gzip or deflate")
    error: zlib.error | None = None
    for wbits in (_WBITS[encoding], -15) if encoding == "deflate" else (_WBITS[encoding],):
        try:
            return _inflate(data, wbits, encoding, limit)
        except zlib.error as exc:
            error = exc
    raise V2Error(f"the body is not valid {encoding} data ({error})")


def _inflate(data: bytes, wbits: int, encoding: str, limit: int) -> bytes:
    """`inflate` in one wrapper format; gzip members one after another make one body (RFC 1952)."""
    parts: list[bytes] = []
    size = 0
    for _ in range(MAX_GZIP_MEMBERS):  # each member copies the bytes after it: bounded, never quadratic
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(data, limit + 1 - size)  # at least 1: size <= limit here
        size += len(out)
        parts.append(out)
        if size > limit or inflater.unconsumed_tail:
            raise too_large(limit)
        if not inflater.eof:
            raise V2Error(f"the {encoding} body is truncated")
        data = inflater.unused_data
        if wbits != _WBITS["gzip"] or data[:2] != b"\x1f\x8b":  # another member starts with gzip's magic
            break
    else:
        raise V2Error(f"the {encoding} body has more than {MAX_GZIP_MEMBERS} members")
    if data:
        raise V2Error(f"the {encoding} body has {len(data)} bytes after its end")
    return parts[0] if len(parts) == 1 else b"".join(parts)


@functools.lru_cache(maxsize=64)  # a client sends the same header each time
def accepted_encoding(accept_encoding: str | None) -> str | None:
    """The encoding to answer with: the first of gzip and deflate that ``Accept-Encoding`` allows."""
    if not accept_encoding:
        return None
    allowed = {}
    for item in accept_encoding.lower().split(","):
        name, *params = item.split(";")
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        allowed[name.strip()] = q
    candidates = [e for e in ENCODINGS if allowed.get(e, allowed.get("*", 0.0)) > 0]
    return max(candidates, key=lambda e: allowed.get(e, allowed.get("*", 0.0)), default=None)


def compress(data: bytes, encoding: str) -> bytes:
    """Encode a response body with gzip or deflate (zlib format); level 1: the bodies are small."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, _WBITS[encoding])
    return compressor.compress(data) + compressor.flush()
