"""`bnpipe serve` over a real socket, through `tritonclient.http`: every route, both data encodings,
compression, request ids, Triton's error codes, batching exactness and merging, and /v1/predict
against `bnpipe predict --json`."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from bnpipe.serve.image import load_digit
from bnpipe.serve.predict import run
from bnpipe.serve.runtime import Model
from tests.serve_server import ServerProcess, running
from tests.test_serve_predict import write_digits
from tests.test_serve_support import build_model, stroke_digit

MAX_BATCH, MAX_BODY = 64, 200_000


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("serve") / "conv.onnx", kind="conv")


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[ServerProcess]:
    with running("--model", str(model_path), "--device", "cpu", "--max-batch-size", str(MAX_BATCH),
                 "--max-body-bytes", str(MAX_BODY), "--name", "digits") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server.url, network_timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(model_path: Path) -> Model:
    return Model.load(str(model_path), "cpu")


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def infer(client: httpclient.InferenceServerClient, x: np.ndarray, binary: bool = True, **kwargs: Any) -> Any:
    inputs = [httpclient.InferInput("pixels", list(x.shape), "UINT8")]
    inputs[0].set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    return client.infer("digits", inputs, outputs=outputs, **kwargs)


def raw(server: ServerProcess, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = server.url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_start_line_health_and_server_metadata(server: ServerProcess, client: httpclient.InferenceServerClient,
                                               model_path: Path) -> None:
    assert server.start_line == (f"bnpipe: serving {model_path} as 'digits' on CPUExecutionProvider at "
                                 f"http://{server.url} (max batch {MAX_BATCH}, ready)")
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "bnpipe" and {"binary_tensor_data", "model_configuration"} <= set(meta["extensions"])


def test_model_metadata_and_config(client: httpclient.InferenceServerClient) -> None:
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    for version in ("", "1"):
        assert client.is_model_ready("digits", version)
        meta = client.get_model_metadata("digits", version)
        assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    config = client.get_model_config("digits")
    parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())  # Triton's own schema
    assert parsed.name == "digits" and parsed.max_batch_size == MAX_BATCH
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 500
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert list(parsed.input[0].dims) == [1, 28, 28] and list(parsed.output[0].dims) == [10]


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_infer_equals_the_model(client: httpclient.InferenceServerClient, reference: Model, binary: bool,
                                compression: str | None) -> None:
    x = images(5, seed=3)
    request_id = uuid.uuid4().hex
    result = infer(client, x, binary, request_id=request_id, request_compression_algorithm=compression,
                   response_compression_algorithm=compression)
    assert result.get_response()["id"] == request_id
    assert np.array_equal(result.as_numpy("logits"), reference.logits(x))


def test_infer_equals_a_bare_onnxruntime_session(client: httpclient.InferenceServerClient, model_path: Path) -> None:
    # A reference that shares no code with the server: onnxruntime's own session on the same file. The
    # server runs with its own thread count and batching, so the sums may round differently: 1e-5.
    import onnxruntime as ort

    x = images(7, seed=4)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = session.run(["logits"], {"pixels": x})[0]
    np.testing.assert_allclose(infer(client, x).as_numpy("logits"), expected, rtol=0, atol=1e-5)
    assert infer(client, x).as_numpy("logits").argmax(1).tolist() == expected.argmax(1).tolist()


def test_nested_json_and_all_outputs_by_default(server: ServerProcess, reference: Model) -> None:
    x = images(2, seed=4)
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 1, 28, 28],
                                   "data": x.tolist()}]}).encode()
    status, headers, answer = raw(server, "POST", "/v2/models/digits/versions/1/infer", gzip.compress(body),
                                  {"Content-Encoding": "gzip", "Content-Type": "application/json"})
    out = json.loads(answer)["outputs"]
    assert status == 200 and headers["content-type"] == "application/json" and "id" not in json.loads(answer)
    assert [o["name"] for o in out] == ["logits"] and out[0]["shape"] == [2, 10]
    assert np.array_equal(np.array(out[0]["data"], np.float32).reshape(2, 10), reference.logits(x))


def error_of(call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def test_errors_through_tritonclient(client: httpclient.InferenceServerClient) -> None:
    assert error_of(lambda: client.get_model_metadata("nope")) == (
        "404", "Request for unknown model: 'nope' is not found")
    assert error_of(lambda: client.get_model_config("digits", "2"))[0] == "404"
    assert error_of(lambda: infer(client, images(MAX_BATCH + 1)))[1] == (
        f"inference request batch-size must be <= {MAX_BATCH} for 'digits', got {MAX_BATCH + 1}")
    wrong = httpclient.InferInput("pixels", [1, 1, 28, 28], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    assert error_of(lambda: client.infer("digits", [wrong])) == (
        "400", "inference input 'pixels' data-type is 'FP32', but model 'digits' expects 'UINT8'")
    unknown = httpclient.InferInput("image", [1, 1, 28, 28], "UINT8")
    unknown.set_data_from_numpy(images(1))
    assert error_of(lambda: client.infer("digits", [unknown]))[1] == "unexpected inference input 'image' for model 'digits'"


def header(shape: list[int], **extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": shape, **extra}]}).encode()


BAD_RAW = [
    ("POST", "/v2/models/digits/infer", b"{bad json", {}, 400, "failed to parse the request JSON"),
    ("POST", "/v2/models/digits/infer", header([2, 1, 28, 28], data=[0] * 784), {}, 400, "holds 784 values"),
    ("POST", "/v2/models/digits/infer", header([0, 1, 28, 28], data=[]), {}, 400, "non-positive dim 0"),
    ("POST", "/v2/models/digits/infer", header([1, 1, 28, 28]), {}, 400, "has no data"),
    ("POST", "/v2/models/digits/infer", header([1, 1, 28, 28], parameters={"binary_data_size": 784}),
     {"Inference-Header-Content-Length": "x"}, 400, "is not a number"),
    ("POST", "/v2/models/digits/infer", b"plain text", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    ("POST", "/v2/models/nope/infer", header([1, 1, 28, 28], data=[0] * 784), {}, 404, "unknown model: 'nope'"),
    ("GET", "/v2/models/digits/infer", None, {}, 405, "Method Not Allowed"),
    ("DELETE", "/v2/health/ready", None, {}, 405, "Method Not Allowed"),
    ("GET", "/v3/anything", None, {}, 404, "no route /v3/anything"),
    ("POST", "/v2/models/digits/infer", bytes(MAX_BODY + 1), {}, 413, f"larger than the limit of {MAX_BODY}"),
    ("POST", "/v2/models/digits/infer", gzip.compress(bytes(50 * MAX_BODY)), {"Content-Encoding": "gzip"}, 413,
     "larger than the limit"),
    ("POST", "/v1/predict", b"not an image", {}, 400, "not an image"),
    ("POST", "/v1/predict?top_k=0", b"", {}, 400, "top_k='0': expected an integer >= 1"),
    # Digits that str.isdigit accepts but int() refuses: a 400 like any bad number, not a 500.
    ("POST", "/v1/predict?top_k=%C2%B2", b"", {}, 400, "top_k='\u00b2': expected an integer >= 1"),
    ("POST", "/v2/models/digits/infer", header([1, 1, 28, 28], parameters={"binary_data_size": 784}),
     {"Inference-Header-Content-Length": "9" * 5000}, 400, "'99999999"),
]


@pytest.mark.parametrize("method,path,body,headers,status,message", BAD_RAW, ids=[b[-1] for b in BAD_RAW])
def test_error_answers(server: ServerProcess, method: str, path: str, body: bytes | None, headers: dict[str, str],
                       status: int, message: str) -> None:
    got, answer_headers, answer = raw(server, method, path, body, headers)
    error = json.loads(answer)["error"]
    assert got == status and answer_headers["content-type"] == "application/json"
    assert message in error and "\n" not in error and "Traceback" not in error


def counter(server: ServerProcess, name: str) -> float:
    _, _, text = raw(server, "GET", "/metrics")
    lines = [line for line in text.decode().splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_concurrent_requests_merge_and_stay_bit_identical(server: ServerProcess,
                                                          client: httpclient.InferenceServerClient) -> None:
    requests = [images(1 + i % 4, seed=100 + i) for i in range(48)]
    alone = [infer(client, x).as_numpy("logits") for x in requests]  # one at a time: a batch of its own
    runs0, count0 = counter(server, "bnpipe_inference_exec_count_total"), counter(server, "bnpipe_inference_count_total")
    results: dict[int, np.ndarray] = {}

    def worker(k: int) -> None:
        c = httpclient.InferenceServerClient(server.url, network_timeout=30)
        for i in range(k, len(requests), 12):
            results[i] = infer(c, requests[i]).as_numpy("logits")
        c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(len(requests)))
    for i, x in enumerate(requests):
        assert np.array_equal(results[i], alone[i]), i
    runs = counter(server, "bnpipe_inference_exec_count_total") - runs0
    assert counter(server, "bnpipe_inference_count_total") - count0 == sum(len(x) for x in requests)
    assert runs < len(requests)  # batches merged requests


def requests_with_status(server: ServerProcess, status: int) -> float:
    _, _, text = raw(server, "GET", "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
               if line.startswith("bnpipe_http_requests_total{") and f'status="{status}"' in line)


def test_a_client_gone_mid_body_and_a_bad_multipart_body_are_no_fault_of_ours(server: ServerProcess) -> None:
    import socket
    import time

    logged, faults, gone = server.stderr(), requests_with_status(server, 500), requests_with_status(server, 499)
    host, port = server.url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # 100 of the 5,000 bytes it promises
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + bytes(100))
    end = time.monotonic() + 10
    while requests_with_status(server, 499) == gone and time.monotonic() < end:
        time.sleep(0.02)
    status, _, answer = raw(server, "POST", "/v1/predict", b"garbage\r\n\r\n",
                            {"Content-Type": "multipart/form-data; boundary=XYZ"})
    assert status == 400 and "bad multipart body" in json.loads(answer)["error"]
    assert requests_with_status(server, 499) == gone + 1 and requests_with_status(server, 500) == faults
    assert server.stderr() == logged  # neither is a fault of the server's to log


def test_metrics_text(server: ServerProcess) -> None:
    status, headers, text = raw(server, "GET", "/metrics")
    body = text.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("bnpipe_http_requests_total{", "bnpipe_batch_size_bucket{", "bnpipe_queue_seconds_bucket{",
                 "bnpipe_compute_seconds_bucket{", "bnpipe_pending_requests{", "bnpipe_inference_exec_count_total{"):
        assert name in body, name
    assert 'route="/v2/models/{name}/infer"' in body


def test_v1_predict_equals_the_cli(server: ServerProcess, model_path: Path, tmp_path: Path) -> None:
    from PIL import Image

    paths, _ = write_digits(tmp_path, 4, seed=9)
    Image.fromarray(np.stack([stroke_digit(120, seed=2)] * 3, -1)).save(tmp_path / "paper.jpg")  # needs preprocessing
    paths.append(str(tmp_path / "paper.jpg"))
    out = io.StringIO()
    assert run(paths, str(model_path), "cpu", as_json=True, top_k=10, stdout=out, stderr=io.StringIO()) == 0
    cli = [json.loads(line) for line in out.getvalue().splitlines()]
    for i, (path, expected) in enumerate(zip(paths, cli)):
        data = Path(path).read_bytes()
        if i % 2:  # a multipart upload, named by its filename
            boundary = "bnpipe-test-boundary"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{Path(path).name}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
            status, _, answer = raw(server, "POST", "/v1/predict?top_k=10&image=1", body,
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        else:
            status, _, answer = raw(server, "POST", "/v1/predict?top_k=10&image=1", data)
        got = json.loads(answer)
        assert status == 200
        assert got["path"] == (Path(path).name if i % 2 else "-")
        assert {k: v for k, v in got.items() if k not in ("path", "input")} == \
            {k: v for k, v in expected.items() if k != "path"}  # identical probabilities
        assert got["input"] == load_digit(path, path).tolist()
    status, _, answer = raw(server, "POST", "/v1/predict", Path(paths[0]).read_bytes())
    assert status == 200 and "input" not in json.loads(answer) and len(json.loads(answer)["top_k"]) == 3


def test_page_is_served(server: ServerProcess) -> None:
    status, headers, body = raw(server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"v1/predict?image=1" in body  # the page calls the predict route, asking for the 28x28 input
