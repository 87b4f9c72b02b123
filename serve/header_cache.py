"""Parsed request headers by their bytes: a client sends the same JSON header with every binary request.

Only the binary tensor data changes from one such request to the next, so the server decodes and
checks each distinct header once (`bnpipe.serve.v2.parse_header`) and then only views the data.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from bnpipe.serve.triton_config import TensorSpec
from bnpipe.serve.v2 import InferHeader, InferRequest, parse_header, parse_infer

MAX_HEADER = 4096  # bytes: larger headers are not kept


class HeaderCache:
    """`parse_infer` for one model, remembering up to ``size`` headers of all-binary requests (oldest out first)."""

    def __init__(self, model: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch: int,
                 size: int = 64) -> None:
        self.spec = (model, inputs, outputs, max_batch)
        self.size = size
        # (header bytes, body length) -> header: every check but the data's depends on these only
        self._headers: OrderedDict[tuple[bytes, int], InferHeader] = OrderedDict()

    def parse(self, body: bytes, header_length: int | None) -> InferRequest:
        """As `parse_infer` with this cache's model; the same request, the same errors."""
        if header_length is None or not 0 <= header_length <= min(len(body), MAX_HEADER):
            return parse_infer(body, header_length, *self.spec)  # all JSON, or refused there
        key = (body[:header_length], len(body))
        header = self._headers.get(key)
        if header is None:
            header = parse_header(key[0], len(body), *self.spec)
            if all(isinstance(data, int) for _, _, _, data in header.inputs):  # no tensor data in the JSON
                self._headers[key] = header
                if len(self._headers) > self.size:
                    self._headers.popitem(last=False)
        return header.bind(body)
