"""The V2 codec and HTTP bodies as pure functions: no socket, no model."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import numpy as np
import pytest

from bnpipe.serve.bodies import accepted_encoding, compress, decimal, inflate
from bnpipe.serve.header_cache import HeaderCache
from bnpipe.serve.triton_config import TensorSpec
from bnpipe.serve.v2 import V2Error, parse_infer
from bnpipe.serve.v2_answers import encode_infer

INPUTS = [TensorSpec("pixels", "UINT8", (-1, 1, 28, 28))]
OUTPUTS = [TensorSpec("logits", "FP32", (-1, 10))]


def parse(header: dict[str, Any], binary: bytes = b"", max_batch: int = 8) -> Any:
    head = json.dumps(header).encode()
    return parse_infer(head + binary, len(head) if binary else None, "m", INPUTS, OUTPUTS, max_batch)


def pixels_input(shape: list[int], **extra: Any) -> dict[str, Any]:
    return {"name": "pixels", "datatype": "UINT8", "shape": shape, **extra}


def test_json_data_flat_and_nested_give_the_same_array() -> None:
    x = np.arange(2 * 784).reshape(2, 1, 28, 28) % 256
    flat = parse({"inputs": [pixels_input([2, 1, 28, 28], data=x.ravel().tolist())]})
    nested = parse({"id": "r1", "inputs": [pixels_input([2, 1, 28, 28], data=x.tolist())]})
    assert flat.inputs["pixels"].dtype == np.uint8 and np.array_equal(flat.inputs["pixels"], x)
    assert np.array_equal(nested.inputs["pixels"], x) and nested.id == "r1" and flat.id is None
    assert flat.outputs == [("logits", False)]  # no outputs asked: all, as JSON


def test_binary_input_and_requested_outputs() -> None:
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    req = parse({"inputs": [pixels_input([3, 1, 28, 28], parameters={"binary_data_size": x.nbytes})],
                 "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}, x.tobytes())
    assert np.array_equal(req.inputs["pixels"], x) and req.outputs == [("logits", True)]
    whole = parse({"inputs": [pixels_input([3, 1, 28, 28], parameters={"binary_data_size": x.nbytes})],
                   "parameters": {"binary_data_output": True}}, x.tobytes())
    assert whole.outputs == [("logits", True)]


def test_an_outputs_own_binary_data_overrides_the_requests_and_no_outputs_means_all() -> None:
    x = [0] * 784
    every = {"parameters": {"binary_data_output": True}}
    asked = parse({"inputs": [pixels_input([1, 1, 28, 28], data=x)], **every,
                   "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]})
    assert asked.outputs == [("logits", False)]  # Triton: "binary_data on an output overrides" the request's
    assert parse({"inputs": [pixels_input([1, 1, 28, 28], data=x)], **every,
                  "outputs": [{"name": "logits"}]}).outputs == [("logits", True)]
    for empty in ([], None):  # Triton's core requests every output when none is
        assert parse({"inputs": [pixels_input([1, 1, 28, 28], data=x, parameters=None)], **every,
                      "outputs": empty}).outputs == [("logits", True)]


BAD = [
    ({"inputs": [pixels_input([1, 1, 28, 28], data=[0] * 784)], "id": 5}, "'id' must be a string"),
    ({"inputs": {}}, "no 'inputs' list"),
    ({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}]}, "unexpected inference input 'x'"),
    ({"inputs": [{**pixels_input([1, 1, 28, 28]), "datatype": "FP32", "data": [0.0] * 784}]},
     "data-type is 'FP32', but model 'm' expects 'UINT8'"),
    ({"inputs": [pixels_input([1, 28, 28], data=[0] * 784)]}, "unexpected shape for input 'pixels'"),
    ({"inputs": [pixels_input([0, 1, 28, 28], data=[])]}, "non-positive dim 0"),
    ({"inputs": [pixels_input([-1, 1, 28, 28], data=[0] * 784)]}, "non-positive dim -1"),
    ({"inputs": [pixels_input([1, 1, 28, "28"], data=[0] * 784)]}, "'shape' must be a list of integers"),
    ({"inputs": [pixels_input([9, 1, 28, 28], data=[0] * 9 * 784)]}, "batch-size must be <= 8"),
    ({"inputs": [pixels_input([1, 1, 28, 28], data=[0] * 783)]}, "holds 783 values but the shape needs 784"),
    ({"inputs": [pixels_input([1, 1, 28, 28], data=[[0] * 784, [0]])]}, "not a regular"),
    ({"inputs": [pixels_input([1, 1, 28, 28], data=[256] + [0] * 783)]}, "holds 256, out of range for UINT8"),
    ({"inputs": [pixels_input([1, 1, 28, 28], data=[0.5] * 784)]}, "not UINT8"),
    ({"inputs": [pixels_input([1, 1, 28, 28], data=["a"] * 784)]}, "not UINT8"),
    ({"inputs": [pixels_input([1, 1, 28, 28], data=[[True] + [0] * 783])]}, "not UINT8"),  # numpy would make it 1
    ({"inputs": [pixels_input([1, 1, 28, 28], data=[0] * 784, parameters=[])]}, "'parameters' must be an object"),
    ({"inputs": [pixels_input([1, 1, 28, 28])]}, "has no data"),
    ({"inputs": []}, "expected 1 inputs but got 0"),
    ({"inputs": [pixels_input([1, 1, 28, 28], data=[0] * 784)] * 2}, "more than once"),
    ({"inputs": [pixels_input([1, 1, 28, 28], data=[0] * 784)], "outputs": [{"name": "probs"}]},
     "unexpected inference output 'probs'"),
    ({"inputs": [pixels_input([1, 1, 28, 28], data=[0] * 784)],
      "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}, "classification extension"),
    ({"inputs": [pixels_input([1, 1, 28, 28], parameters={"binary_data_size": 10})]}, "expecting 784 bytes"),
    ({"inputs": [pixels_input([1, 1, 28, 28], parameters={"binary_data_size": 784})]}, "past the body's"),
]


@pytest.mark.parametrize("header,message", BAD, ids=[m for _, m in BAD])
def test_bad_requests_are_400_with_one_line(header: dict[str, Any], message: str) -> None:
    with pytest.raises(V2Error, match=message.replace("(", r"\(")) as info:
        parse(header)
    assert info.value.status == 400 and "\n" not in str(info.value)


@pytest.mark.parametrize("body,length,message", [
    (b"{not json", None, "failed to parse the request JSON"), (b"[1]", None, "must be an object"),
    (b"\xff\xfe", None, "failed to parse"), (b"[" * 100000, None, "failed to parse"),
    (b"{}", 10, "outside the body"),
    (json.dumps({"inputs": [pixels_input([1, 1, 28, 28], data=[0] * 784)]}).encode() + b"xx", None, "failed to parse"),
])
def test_malformed_bodies(body: bytes, length: int | None, message: str) -> None:
    with pytest.raises(V2Error, match=message):
        parse_infer(body, length, "m", INPUTS, OUTPUTS, 8)


def test_extra_binary_bytes_are_refused() -> None:
    header = {"inputs": [pixels_input([1, 1, 28, 28], parameters={"binary_data_size": 784})]}
    with pytest.raises(V2Error, match="2 bytes of binary data that no input claims"):
        parse(header, bytes(786))


def test_encode_json_and_binary() -> None:
    logits = np.random.default_rng(1).standard_normal((2, 10)).astype(np.float32)
    body, length = encode_infer("m", "1", "abc", [("logits", logits, False)])
    assert length is None
    doc = json.loads(body)
    assert doc["id"] == "abc" and doc["model_name"] == "m" and doc["model_version"] == "1"
    out = doc["outputs"][0]
    assert out["datatype"] == "FP32" and out["shape"] == [2, 10]
    assert np.array_equal(np.array(out["data"], np.float32).reshape(2, 10), logits)  # exact round trip
    body, length = encode_infer("m", "1", None, [("logits", logits, True)])
    doc = json.loads(body[:length])
    assert "id" not in doc and doc["outputs"][0]["parameters"] == {"binary_data_size": 80}
    assert np.array_equal(np.frombuffer(body[length:], np.float32).reshape(2, 10), logits)


@pytest.mark.parametrize("encoding,pack", [("gzip", gzip.compress), ("deflate", zlib.compress),
                                           ("deflate", lambda d: zlib.compress(d)[2:-4])])  # raw deflate too
def test_inflate_round_trips(encoding: str, pack: Any) -> None:
    data = b"digits " * 1000
    assert inflate(pack(data), encoding, 10_000) == data
    assert inflate(compress(data, encoding), encoding, 10_000) == data


def test_gzip_members_one_after_another_are_one_body() -> None:
    assert inflate(gzip.compress(b"seven ") + gzip.compress(b"eight"), "gzip", 100) == b"seven eight"
    with pytest.raises(V2Error, match="more than 16 members"):  # each member copies the rest: bounded
        inflate(gzip.compress(b"") * 17, "gzip", 100)
    with pytest.raises(V2Error, match="larger than the limit of 10") as info:  # the limit counts every member
        inflate(gzip.compress(bytes(6)) + gzip.compress(bytes(6)), "gzip", 10)
    assert info.value.status == 413


def test_inflate_bomb_is_413_without_inflating_it_all() -> None:
    import tracemalloc

    bomb = gzip.compress(bytes(200 << 20))  # 200 MiB of zeros in ~200 KB
    tracemalloc.start()
    try:
        with pytest.raises(V2Error, match="larger than the limit of 1048576") as info:
            inflate(bomb, "gzip", 1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.status == 413 and peak < 4 << 20  # about the limit, never the 200 MiB


@pytest.mark.parametrize("data,encoding,message", [
    (b"plain", "gzip", "not valid gzip"), (gzip.compress(b"x" * 100)[:20], "gzip", "truncated"),
    (gzip.compress(b"x") + b"junk", "gzip", "after its end"), (b"x", "br", "unsupported Content-Encoding 'br'"),
])
def test_bad_encodings_are_400(data: bytes, encoding: str, message: str) -> None:
    with pytest.raises(V2Error, match=message) as info:
        inflate(data, encoding, 1000)
    assert info.value.status == 400


@pytest.mark.parametrize("header,expected", [
    (None, None), ("", None), ("gzip", "gzip"), ("deflate", "deflate"), ("br, deflate", "deflate"),
    ("gzip;q=0.5, deflate", "deflate"), ("gzip;q=0", None), ("*", "gzip"), ("identity", None),
    ("gzip; level=1; q=0", None), ("deflate;q=0.1, gzip ; foo=bar ;q=0.2", "gzip"),
])
def test_accepted_encoding(header: str | None, expected: str | None) -> None:
    assert accepted_encoding(header) == expected


def test_mutated_requests_only_ever_raise_v2error() -> None:
    """2,000 seeded mutations of a valid request: each parses or is a one-line V2Error, nothing else."""
    import random

    rng = random.Random(0)
    values = [None, True, False, 0, -1, 1, 2**70, 1.5, "", "x", "pixels", "UINT8", "logits", [], {}, [1],
              [1, 1, 28, 28], {"binary_data_size": 784}, {"binary_data": True}, {"classification": 2}, [[1]]]

    def mutate(obj: Any, depth: int = 0) -> Any:
        if isinstance(obj, dict):
            obj = dict(obj)
            key = rng.choice([*obj, "new"])
            if rng.random() < 0.2:
                obj.pop(key, None)
            else:
                obj[key] = mutate(obj.get(key), depth + 1) if rng.random() < 0.5 and depth < 4 else rng.choice(values)
            return obj
        if isinstance(obj, list) and obj and depth < 4:
            obj = list(obj)
            i = rng.randrange(len(obj))
            obj[i] = mutate(obj[i], depth + 1)
            return obj
        return rng.choice(values)

    base = {"id": "a", "inputs": [pixels_input([1, 1, 28, 28], parameters={"binary_data_size": 784})],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    for _ in range(2000):
        head = json.dumps(mutate(mutate(base))).encode()
        try:
            parse_infer(head + bytes(rng.choice([0, 783, 784])), rng.choice([len(head), None, 0]), "m", INPUTS,
                        OUTPUTS, 8)
        except V2Error as exc:
            assert "\n" not in str(exc)


def test_header_cache_answers_as_parse_infer_and_keeps_only_binary_headers() -> None:
    cache = HeaderCache("m", INPUTS, OUTPUTS, 8, size=4)
    rng = np.random.default_rng(1)
    heads = [json.dumps(h).encode() for h in [
        {"id": "x", "inputs": [pixels_input([2, 1, 28, 28], parameters={"binary_data_size": 1568})]},
        {"inputs": [pixels_input([1, 1, 28, 28], data=[3] * 784)]},
        {"inputs": [pixels_input([1, 1, 28, 28], parameters={"binary_data_size": 784})], "outputs": [{"name": "no"}]}]]
    heads.append(b"{not json")

    def outcome(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except V2Error as exc:
            return f"{exc.status} {exc}"

    for _ in range(3):  # then from the cache, with new data each time
        for head in heads:
            for extra in (0, 784, 1568, 1569):
                body = head + rng.integers(0, 256, extra, dtype=np.uint8).tobytes()
                for length in (len(head), None, len(body) + 1):
                    want = outcome(parse_infer, body, length, "m", INPUTS, OUTPUTS, 8)
                    got = outcome(cache.parse, body, length)
                    if isinstance(want, str):
                        assert got == want
                    else:
                        assert (got.id, got.outputs, list(got.inputs)) == (want.id, want.outputs, list(want.inputs))
                        assert got.inputs["pixels"].dtype == np.uint8
                        assert np.array_equal(got.inputs["pixels"], want.inputs["pixels"])
    assert len(cache._headers) == 1  # the one valid binary header; errors and JSON data are not kept


@pytest.mark.parametrize("raw,expected", [("784", 784), (" 784\t", 784), ("+5", None), ("-1", None), ("5 5", None),
                                          ("\u00b2", None), ("9" * 19, None), ("", None)])
def test_decimal_header_values(raw: str, expected: int | None) -> None:
    assert decimal(raw) == expected


def test_a_scalar_data_for_a_one_value_input_is_a_value_not_a_crash() -> None:
    one = [TensorSpec("pixels", "UINT8", (-1, 1))]
    for data, ok in ((5, True), ([5], True), (True, False), ([True], False)):
        head = json.dumps({"inputs": [pixels_input([1, 1], data=data)]}).encode()
        try:
            assert parse_infer(head, None, "m", one, OUTPUTS, 8).inputs["pixels"].tolist() == [[5]] and ok
        except V2Error as exc:
            assert not ok and "not UINT8" in str(exc)
