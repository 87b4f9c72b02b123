"""The Open Inference Protocol's (KServe V2) small answers: errors, server and model metadata."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bnpipe.serve.triton_config import TensorSpec


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
