"""The Open Inference Protocol's (KServe V2) answers: inference results, errors, server and model metadata."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from bnpipe.serve.triton_config import TensorSpec
from bnpipe.serve.v2 import DTYPES

_V2_NAMES = {t: name for name, t in DTYPES.items()}
_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps with arguments builds one per call


def error_body(message: str) -> bytes:
    """The JSON body of an error answer: ``{"error": "..."}`` on one line."""
    return json.dumps({"error": " ".join(message.split())}).encode()


def server_metadata(name: str, version: str, extensions: Sequence[str]) -> dict[str, Any]:
    """The answer to ``GET /v2``."""
    return {"name": name, "version": version, "extensions": list(extensions)}


def model_metadata(name: str, version: str, platform: str, inputs: Sequence[TensorSpec],
                   outputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """The answer to ``GET /v2/models/{name}``: platform, and each tensor with its batch axis as -1."""
    return {"name": name, "versions": [version], "platform": platform,
            "inputs": [_tensor(s) for s in inputs], "outputs": [_tensor(s) for s in outputs]}


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def encode_infer(model: str, version: str, request_id: str | None,
                 outputs: Sequence[tuple[str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """Encode an inference response.

    Args:
        model: The model's name.
        version: The model's version, e.g. "1".
        request_id: The request's ``id``, echoed back; None leaves it out.
        outputs: (name, array, as binary data) per output, in the order asked for.

    Returns:
        (body, header length): the length of the JSON header when binary data follows it (the
        ``Inference-Header-Content-Length`` header to send), else None.
    """
    entries = []
    chunks = []
    for name, array, binary in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": _v2_type(array.dtype), "shape": list(array.shape)}
        if binary:
            chunk = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = entries
    header = _ENCODER.encode(response).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _v2_type(dtype: np.dtype) -> str:
    try:
        return _V2_NAMES[dtype]
    except KeyError:
        raise ValueError(f"no V2 datatype for numpy {dtype}") from None
