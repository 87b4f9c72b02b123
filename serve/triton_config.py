"""Triton's model configuration for an ONNX model: the JSON of ``GET .../config`` and config.pbtxt.

`triton_config` builds the configuration as the JSON-able dict that Triton's
``GET /v2/models/{name}/config`` returns (protobuf ``ModelConfig`` field names, enums as their
names); `render_pbtxt` writes the same content as ``config.pbtxt`` text. The repository on disk
(writing it, and finding the model in it for ``bnpipe serve --model DIR``) is `triton_repo`.

No torch, no onnx, no protobuf: the server imports this. The tests check the output against
Triton's own schema (``tritonclient.grpc.model_config_pb2``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnpipe.errors import BnpipeError
from bnpipe.serve.runtime import CUDA_OPTIONS

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"  # Triton's default_model_filename for onnxruntime_onnx
TRITON_DEVICES = ("gpu", "cpu")
# onnxruntime element type -> the V2 protocol's datatype; Triton's config type is `config_type` of it.
ORT_TO_V2 = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16", "tensor(string)": "BYTES",
}  # fmt: skip
# The CUDA execution provider options that predict and serve use, minus the device, which
# Triton sets per instance. Keys and values are onnxruntime's own: Triton's onnxruntime backend
# passes the "cuda" accelerator's parameters to UpdateCUDAProviderOptions unchanged.
TRITON_CUDA_OPTIONS = {k: v for k, v in CUDA_OPTIONS.items() if k != "device_id"}
# The backend's older spelling of the search, as a model parameter: 0 EXHAUSTIVE, 1 HEURISTIC, 2 DEFAULT.
_ALGO_SEARCH_CODES = {"EXHAUSTIVE": "0", "HEURISTIC": "1", "DEFAULT": "2"}
# Fields whose values render as bare enum names, and map fields (rendered as key/value entries).
_ENUM_FIELDS = frozenset({"data_type", "kind", "format"})
_MAP_FIELDS = frozenset({"parameters", "inputs"})
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: ``shape`` includes the batch axis as -1 (any dynamic dim is -1)."""

    name: str
    datatype: str  # V2 datatype, e.g. "UINT8", "FP32"
    shape: tuple[int, ...]


def tensor_specs(args: Sequence[Any]) -> list[TensorSpec]:
    """Turn onnxruntime ``NodeArg`` objects (``session.get_inputs()``) into `TensorSpec` objects.

    Raises:
        BnpipeError: an element type with no V2 datatype (sequences, maps, optional types).
    """
    specs = []
    for arg in args:
        if arg.type not in ORT_TO_V2:
            raise BnpipeError(f"tensor '{arg.name}': type {arg.type} has no Triton datatype")
        specs.append(TensorSpec(arg.name, ORT_TO_V2[arg.type],
                                tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)))
    return specs


def config_type(datatype: str) -> str:
    """Triton's config ``data_type`` for a V2 datatype: ``TYPE_`` + it, except BYTES, which is TYPE_STRING."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes the dynamic batcher aims for: 16, 64, 256, ... below the maximum, and the maximum.

    1 is never preferred unless it is the maximum: a pending request of one would then be sent
    at once, and no batch would ever form.
    """
    sizes, size = [], 16
    while size < max_batch_size:
        sizes.append(size)
        size *= 4
    return sizes + [max_batch_size]


def check_model_name(name: str) -> None:
    """Refuse a model name that could not be a repository folder (and a URL path segment).

    Raises:
        BnpipeError: the name is empty, starts with '.' or '-', or has other characters than
            letters, digits, '_', '.' and '-'.
    """
    if not _NAME.fullmatch(name):
        raise BnpipeError(f"model name {name!r}: use letters, digits, '_', '.' and '-' (it names a folder)")


def _dims(spec: TensorSpec) -> list[int]:
    """The config's dims: the shape without its batch axis (which must be dynamic)."""
    if not spec.shape or spec.shape[0] != -1:
        raise BnpipeError(f"tensor '{spec.name}': shape {list(spec.shape)} has no dynamic batch axis first")
    return list(spec.shape[1:])


def _warmup(inputs: Sequence[TensorSpec], batch_size: int) -> dict[str, Any]:
    """One model_warmup entry: all-zero inputs of ``batch_size`` rows, run once."""
    tensors = {}
    for spec in inputs:
        dims = _dims(spec)
        if any(d < 0 for d in dims):
            raise BnpipeError(f"tensor '{spec.name}': dims {dims} are not fixed, so no warm-up input can be made")
        tensors[spec.name] = {"data_type": config_type(spec.datatype), "dims": dims, "zero_data": True}
    return {"name": f"zeros_batch_{batch_size}", "batch_size": batch_size, "inputs": tensors, "count": 1}


def triton_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
                  max_batch_size: int = 256, max_queue_delay_us: int = 500, device: str = "gpu",
                  instances: int = 1) -> dict[str, Any]:
    """Build Triton's model configuration for an ONNX model, as the JSON of ``GET .../config``.

    Args:
        name: The model's name (its folder in the repository).
        inputs: The graph inputs (`tensor_specs` of ``session.get_inputs()``).
        outputs: The graph outputs.
        max_batch_size: Most rows in one run; also the largest preferred batch size.
        max_queue_delay_us: Longest a request waits for others to join its batch.
        device: ``gpu`` (KIND_GPU, with the CUDA provider options predict uses) or ``cpu``.
        instances: Model instances (sessions) per device.

    Returns:
        A dict with ``ModelConfig`` field names, ready for `json.dumps` or `render_pbtxt`.

    Raises:
        BnpipeError: a bad name, device or size, or tensors Triton cannot batch.
    """
    check_model_name(name)
    if device not in TRITON_DEVICES:
        raise BnpipeError(f"triton device {device!r}: expected one of {', '.join(TRITON_DEVICES)}")
    if max_batch_size < 1 or max_queue_delay_us < 0 or instances < 1:
        raise BnpipeError(f"max_batch_size {max_batch_size}, max_queue_delay_us {max_queue_delay_us}, "
                          f"instances {instances}: expected >= 1, >= 0 and >= 1")
    preferred = preferred_batch_sizes(max_batch_size)
    config: dict[str, Any] = {
        "name": name,
        "platform": PLATFORM,
        "max_batch_size": max_batch_size,
        "input": [{"name": s.name, "data_type": config_type(s.datatype), "dims": _dims(s)} for s in inputs],
        "output": [{"name": s.name, "data_type": config_type(s.datatype), "dims": _dims(s)} for s in outputs],
        "dynamic_batching": {"preferred_batch_size": preferred, "max_queue_delay_microseconds": max_queue_delay_us},
        "instance_group": [{"kind": f"KIND_{device.upper()}", "count": instances}],
    }
    if device == "gpu":
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "cuda", "parameters": dict(TRITON_CUDA_OPTIONS)}]}}
        # The backend also reads this legacy parameter, and once the config has any top-level
        # parameters it falls back to EXHAUSTIVE without it, overriding the accelerator's choice.
        search = _ALGO_SEARCH_CODES[TRITON_CUDA_OPTIONS["cudnn_conv_algo_search"]]
        config["parameters"] = {"cudnn_conv_algo_search": {"string_value": search}}
    # Warm each instance at 1 and at every preferred size, so no first request pays for setup.
    config["model_warmup"] = [_warmup(inputs, b) for b in sorted({1, *preferred})]
    return config


def _scalar(key: str, value: Any) -> str:
    """A scalar in protobuf text format: enums bare, strings quoted, booleans lower case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if key in _ENUM_FIELDS:
        return str(value)
    # Text format takes UTF-8 as is; only the quote, the backslash and line breaks need escapes.
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _message(fields: dict[str, Any], indent: str) -> list[str]:
    """The lines of one message's fields, each indented by ``indent``."""
    lines = []
    for key, value in fields.items():
        if key in _MAP_FIELDS:
            for k, v in value.items():  # map<string, X>: one entry block per key
                lines.append(f"{indent}{key} {{")
                lines.append(f"{indent}  key: {_scalar('key', k)}")
                if isinstance(v, dict):
                    lines += [f"{indent}  value {{", *_message(v, indent + "    "), f"{indent}  }}"]
                else:
                    lines.append(f"{indent}  value: {_scalar('value', v)}")
                lines.append(f"{indent}}}")
        elif isinstance(value, dict):
            lines += [f"{indent}{key} {{", *_message(value, indent + "  "), f"{indent}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{indent}{key} [")
            for i, item in enumerate(value):
                close = "}," if i < len(value) - 1 else "}"
                lines += [f"{indent}  {{", *_message(item, indent + "    "), f"{indent}  {close}"]
            lines.append(f"{indent}]")
        elif isinstance(value, list):
            lines.append(f"{indent}{key}: [ {', '.join(_scalar(key, v) for v in value)} ]")
        else:
            lines.append(f"{indent}{key}: {_scalar(key, value)}")
    return lines


def render_pbtxt(config: dict[str, Any]) -> str:
    """Render a `triton_config` dict as ``config.pbtxt`` (protobuf text format of ``ModelConfig``)."""
    return "\n".join(_message(config, "")) + "\n"

