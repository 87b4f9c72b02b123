"""Triton's model configuration, checked against Triton's own schema (tritonclient's model_config_pb2).

`text_format.Parse` and `json_format.ParseDict` both refuse a field the schema does not have, so
a misspelt field in `triton_config` fails these tests.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from bnpipe.errors import BnpipeError
from bnpipe.serve.runtime import CUDA_OPTIONS
from bnpipe.serve.triton_config import (
    ORT_TO_V2, TensorSpec, config_type, preferred_batch_sizes, render_pbtxt, tensor_specs, triton_config,
)  # fmt: skip

PIXELS = TensorSpec("pixels", "UINT8", (-1, 1, 28, 28))
LOGITS = TensorSpec("logits", "FP32", (-1, 10))


def parse_both(config: dict[str, Any]) -> model_config_pb2.ModelConfig:
    """Parse the rendered config.pbtxt and the JSON dict with Triton's schema; they must agree."""
    from_text = text_format.Parse(render_pbtxt(config), model_config_pb2.ModelConfig())
    from_json = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    assert from_text == from_json
    return from_text


def test_gpu_config_matches_triton_schema_and_predict_options() -> None:
    cfg = parse_both(triton_config("bnpipe", [PIXELS], [LOGITS], max_batch_size=256, max_queue_delay_us=500))
    T = model_config_pb2
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("bnpipe", "onnxruntime_onnx", 256)
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("pixels", T.TYPE_UINT8, [1, 28, 28])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("logits", T.TYPE_FP32, [10])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 64, 256]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(T.ModelInstanceGroup.KIND_GPU, 1)]
    (accel,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    expected = {k: v for k, v in CUDA_OPTIONS.items() if k != "device_id"}  # Triton sets the device
    assert accel.name == "cuda" and dict(accel.parameters) == expected
    assert expected["cudnn_conv_algo_search"] == "HEURISTIC"  # and the legacy spelling agrees: 1 = HEURISTIC
    assert cfg.parameters["cudnn_conv_algo_search"].string_value == "1"
    warm = [(w.batch_size, w.count, dict(w.inputs)) for w in cfg.model_warmup]
    assert [b for b, _, _ in warm] == [1, 16, 64, 256]
    for _, count, inputs in warm:
        assert count == 1 and list(inputs) == ["pixels"]
        assert (inputs["pixels"].data_type, list(inputs["pixels"].dims), inputs["pixels"].zero_data) == \
            (T.TYPE_UINT8, [1, 28, 28], True)


def test_cpu_config_has_cpu_instances_and_no_cuda_options() -> None:
    cfg = parse_both(triton_config("m.v2-x", [PIXELS], [LOGITS], max_batch_size=8, max_queue_delay_us=0,
                                   device="cpu", instances=2))
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)]
    assert not cfg.HasField("optimization") and not cfg.parameters
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8]
    assert [w.batch_size for w in cfg.model_warmup] == [1, 8]


@pytest.mark.parametrize("typo", [("max_queue_delay_microseconds", "max_queue_delay_microsecond"),
                                  ("preferred_batch_size", "preferred_batch_sizes"), ("KIND_GPU", "KIND_GUP")])
def test_schema_refuses_a_misspelt_field(typo: tuple[str, str]) -> None:
    """The check the other tests rely on: Triton's schema rejects any name it does not define."""
    text = render_pbtxt(triton_config("bnpipe", [PIXELS], [LOGITS]))
    assert typo[0] in text
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text.replace(typo[0], typo[1]), model_config_pb2.ModelConfig())


@pytest.mark.parametrize(("largest", "preferred"), [(1, [1]), (16, [16]), (17, [16, 17]), (256, [16, 64, 256]),
                                                   (1000, [16, 64, 256, 1000])])
def test_preferred_batch_sizes(largest: int, preferred: list[int]) -> None:
    assert preferred_batch_sizes(largest) == preferred


def test_every_onnxruntime_type_has_a_triton_config_type() -> None:
    """Each datatype `tensor_specs` can produce is one Triton's schema knows (BYTES is TYPE_STRING)."""
    specs = [TensorSpec(f"t{i}", v2, (-1, 2)) for i, v2 in enumerate(ORT_TO_V2.values())]
    cfg = parse_both(triton_config("all", specs, [LOGITS]))
    names = [model_config_pb2.DataType.Name(i.data_type) for i in cfg.input]
    assert names == [config_type(s.datatype) for s in specs] and "TYPE_STRING" in names


def test_strings_are_escaped() -> None:
    config = {"name": 'a "quoted" \\ name\n', "parameters": {"k": {"string_value": "é"}}}
    parsed = text_format.Parse(render_pbtxt(config), model_config_pb2.ModelConfig())
    assert parsed.name == config["name"] and parsed.parameters["k"].string_value == "é"


def test_tensor_specs_from_onnxruntime_args() -> None:
    args = [SimpleNamespace(name="pixels", type="tensor(uint8)", shape=["batch", 1, 28, 28]),
            SimpleNamespace(name="x", type="tensor(float16)", shape=[None, 3, "h", -1])]
    assert tensor_specs(args) == [PIXELS, TensorSpec("x", "FP16", (-1, 3, -1, -1))]
    with pytest.raises(BnpipeError, match="'s': type seq"):
        tensor_specs([SimpleNamespace(name="s", type="seq(tensor(float))", shape=[])])


def test_tensor_specs_of_the_exported_model(exported_models: dict[str, Path]) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported_models["onnx_folded"]), providers=["CPUExecutionProvider"])
    assert tensor_specs(session.get_inputs()) == [PIXELS]
    assert tensor_specs(session.get_outputs()) == [LOGITS]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "../up"}, "model name '../up'"),
    ({"name": ""}, "model name ''"),
    ({"device": "tpu"}, "triton device 'tpu'"),
    ({"max_batch_size": 0}, "max_batch_size 0"),
    ({"max_queue_delay_us": -1}, "max_queue_delay_us -1"),
    ({"instances": 0}, "instances 0"),
    ({"inputs": [TensorSpec("pixels", "UINT8", (1, 28, 28))]}, "no dynamic batch axis"),
    ({"inputs": [TensorSpec("pixels", "UINT8", (-1, 1, -1, -1))]}, "no warm-up input"),
])  # fmt: skip
def test_bad_arguments_are_one_line_errors(kwargs: dict[str, Any], message: str) -> None:
    args = {"name": "bnpipe", "inputs": [PIXELS], "outputs": [LOGITS], **kwargs}
    with pytest.raises(BnpipeError, match=message) as info:
        triton_config(args.pop("name"), args.pop("inputs"), args.pop("outputs"), **args)
    assert "\n" not in str(info.value)
