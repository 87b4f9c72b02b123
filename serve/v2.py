"""The Open Inference Protocol (KServe V2, Triton's HTTP/REST) codec: pure functions, no sockets.

`parse_infer` turns the body of `POST /v2/models/{name}/infer` into numpy arrays, with the JSON
header and the binary tensor data extension (`Inference-Header-Content-Length`, each input's
``binary_data_size``); `bnpipe.serve.v2_answers.encode_infer` writes the answer the same way. Every
fault in a request is a `V2Error` carrying the status code Triton answers with and one line saying
what is wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnpipe.errors import one_line
from bnpipe.serve.triton_config import TensorSpec  # name, V2 datatype, shape with the batch axis as -1

# V2 datatype -> numpy dtype (BYTES, variable-length strings, is not a tensor type our models take)
DTYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in [
    ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
    ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64), ("FP16", np.float16),
    ("FP32", np.float32), ("FP64", np.float64)]}


class V2Error(Exception):
    """A request the server refuses: ``status`` is the HTTP code, the message one line."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    """A parsed inference request: the arrays by input name and the outputs asked for."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]] = field(default_factory=list)  # (name, as binary data), in order


def _shape(value: Any, where: str) -> list[int]:
    # Plain loops and exact type checks: this runs for every request (bool is not an int here).
    if type(value) is not list:
        raise V2Error(f"{where}: 'shape' must be a list of integers, got {json.dumps(value)[:80]}")
    for d in value:
        if type(d) is not int:
            raise V2Error(f"{where}: 'shape' must be a list of integers, got {json.dumps(value)[:80]}")
        if d <= 0:
            raise V2Error(f"{where}: shape {value} has a non-positive dim {d}")
    return value


def _check_shape(shape: list[int], spec: TensorSpec, model: str, max_batch: int) -> None:
    expected = spec.shape
    fits = len(shape) == len(expected)
    if fits:
        for want, got in zip(expected, shape):
            if want != got and want != -1:
                fits = False
    if not fits:
        raise V2Error(f"unexpected shape for input '{spec.name}' for model '{model}'. Expected "
                      f"{list(expected)}, got {shape}")
    if shape[0] > max_batch:
        raise V2Error(f"inference request batch-size must be <= {max_batch} for '{model}', got {shape[0]}")


def _has_bool(data: Any) -> bool:
    """Whether a (regular, numpy-accepted) nested list holds a JSON true or false."""
    return type(data) is list and any(v is True or v is False or _has_bool(v) for v in data)


def _json_data(data: Any, spec: TensorSpec, count: int, where: str) -> np.ndarray:
    """A JSON ``data`` list (flat or nested, row-major) as a flat array of the input's dtype."""
    dtype = DTYPES[spec.datatype]
    try:
        values = np.array(data)
    except (ValueError, TypeError, RecursionError):  # ragged or absurdly deep nesting
        raise V2Error(f"{where}: 'data' is not a regular (flat or nested) list of numbers") from None
    kind = values.dtype.kind
    if values.size != count:
        raise V2Error(f"{where}: 'data' holds {values.size} values but the shape needs {count}")
    if (kind not in "biuf" or (kind == "b") != (dtype.kind == "b") or (kind == "f" and dtype.kind != "f")
            or (kind != "b" and _has_bool(data))):  # numpy turns [true, 3] into [1, 3]
        raise V2Error(f"{where}: 'data' holds values that are not {spec.datatype}")
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise V2Error(f"{where}: 'data' holds {low if low < info.min else high}, out of range for {spec.datatype}")
    return values.astype(dtype, copy=False).reshape(-1)


def parse_infer(body: bytes, header_length: int | None, model: str, inputs: Sequence[TensorSpec],
                outputs: Sequence[TensorSpec], max_batch: int) -> InferRequest:
    """Decode an inference request.

    Args:
        body: The whole (inflated) request body.
        header_length: The ``Inference-Header-Content-Length`` header: the JSON is the body's first
            that many bytes and the binary tensor data follows; None when the body is all JSON.
        model: The model's name, for messages.
        inputs: What the model takes; every one must be given.
        outputs: What the model returns; requested outputs must be among them.
        max_batch: The largest batch one request may carry.

    Returns:
        The request, each input as an array of its spec's dtype and the request's shape.

    Raises:
        V2Error: 400 for anything wrong in the request.
    """
    size = len(body) if header_length is None else header_length
    if size < 0 or size > len(body):
        raise V2Error(f"Inference-Header-Content-Length {header_length} is outside the body's {len(body)} bytes")
    return parse_header(body[:size], len(body), model, inputs, outputs, max_batch).bind(body)


@dataclass
class InferHeader:
    """A request's JSON header, checked against the model and the body's length (`parse_header`)."""

    id: str | None
    inputs: list[tuple[str, list[int], np.dtype, int | np.ndarray]]  # name, shape, dtype, binary offset or JSON data
    outputs: list[tuple[str, bool]]

    def bind(self, body: bytes) -> InferRequest:
        """The request, each binary input viewed in ``body`` (of the length the header was checked with)."""
        arrays = {name: (np.frombuffer(body, dtype, math.prod(shape), data) if isinstance(data, int) else data)
                  .reshape(shape) for name, shape, dtype, data in self.inputs}
        return InferRequest(self.id, arrays, self.outputs)


def parse_header(header_bytes: bytes, body_size: int, model: str, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], max_batch: int) -> InferHeader:
    """Decode and check a request's JSON header, the first part of a body of ``body_size`` bytes.

    As `parse_infer`, which binds the result to the body; a header depends on nothing else, so the
    server parses each distinct binary-request header once (`HeaderCache`).
    """
    size = len(header_bytes)
    try:
        header = json.loads(header_bytes)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise V2Error(f"failed to parse the request JSON buffer: {one_line(exc, 200)}") from None
    if not isinstance(header, dict):
        raise V2Error("the request JSON must be an object")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2Error("'id' must be a string")
    given = header.get("inputs")
    if not isinstance(given, list):
        raise V2Error(f"the request for model '{model}' has no 'inputs' list")
    specs = {s.name: s for s in inputs}
    parsed: dict[str, tuple[str, list[int], np.dtype, int | np.ndarray]] = {}
    offset = size
    for entry in given:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise V2Error("each of 'inputs' must be an object with a 'name'")
        name = entry["name"]
        spec = specs.get(name)
        if spec is None:
            raise V2Error(f"unexpected inference input '{name}' for model '{model}'")
        if name in parsed:
            raise V2Error(f"input '{name}' is given more than once")
        where = f"input '{name}'"
        if entry.get("datatype") != spec.datatype:
            raise V2Error(f"inference input '{name}' data-type is '{entry.get('datatype')}', but model "
                          f"'{model}' expects '{spec.datatype}'")
        shape = _shape(entry.get("shape"), where)
        _check_shape(shape, spec, model, max_batch)
        count = math.prod(shape)
        params = entry.get("parameters")
        if params is None:
            params = {}
        elif not isinstance(params, dict):
            raise V2Error(f"{where}: 'parameters' must be an object")
        nbytes = params.get("binary_data_size")
        data: int | np.ndarray
        if nbytes is not None:
            expected = count * DTYPES[spec.datatype].itemsize
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes != expected:
                raise V2Error(f"unexpected size for input '{name}', expecting {expected} bytes for model "
                              f"'{model}', got binary_data_size {json.dumps(nbytes)[:40]}")
            if offset + nbytes > body_size:
                raise V2Error(f"{where}: binary data ends at byte {offset + nbytes}, past the body's {body_size}")
            data = offset
            offset += nbytes
        elif "data" in entry:
            data = _json_data(entry["data"], spec, count, where)
        else:
            raise V2Error(f"input '{name}' has no data: give 'data' or parameters.binary_data_size")
        parsed[name] = (name, shape, DTYPES[spec.datatype], data)
    if offset != body_size:
        raise V2Error(f"the body has {body_size - offset} bytes of binary data that no input claims")
    missing = [s.name for s in inputs if s.name not in parsed]
    if missing:
        raise V2Error(f"expected {len(inputs)} inputs but got {len(parsed)} inputs for model '{model}' "
                      f"(missing {', '.join(repr(m) for m in missing)})")
    batches = {shape[0] for _, shape, _, _ in parsed.values()}
    if len(batches) > 1:
        raise V2Error(f"the inputs of model '{model}' have different batch sizes {sorted(batches)}")
    return InferHeader(request_id, list(parsed.values()), _requested(header, outputs, model))


def _flag(params: Any, key: str, where: str, default: bool = False) -> bool:
    """``params[key]``, true or false; ``default`` where it is not given."""
    if params is None:
        return default
    if not isinstance(params, dict):
        raise V2Error(f"{where}: 'parameters' must be an object")
    if "classification" in params:
        raise V2Error(f"{where}: the classification extension is not supported")
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise V2Error(f"{where}: '{key}' must be true or false")
    return value


def _requested(header: dict[str, Any], outputs: Sequence[TensorSpec], model: str) -> list[tuple[str, bool]]:
    """The outputs asked for, each with whether it goes back as binary data.

    None listed (no ``outputs``, or an empty list: Triton's core requests every output then) means
    all. An output's own ``binary_data`` overrides the request's ``binary_data_output``.
    """
    all_binary = _flag(header.get("parameters"), "binary_data_output", "the request")
    asked = header.get("outputs")
    if asked is not None and not isinstance(asked, list):
        raise V2Error("'outputs' must be a list")
    if not asked:
        return [(s.name, all_binary) for s in outputs]
    known = {s.name for s in outputs}
    result: list[tuple[str, bool]] = []
    for entry in asked:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise V2Error("each of 'outputs' must be an object with a 'name'")
        name = entry["name"]
        if name not in known:
            raise V2Error(f"unexpected inference output '{name}' for model '{model}'")
        if any(name == n for n, _ in result):
            raise V2Error(f"output '{name}' is requested more than once")
        result.append((name, _flag(entry.get("parameters"), "binary_data", f"output '{name}'", all_binary)))
    return result
