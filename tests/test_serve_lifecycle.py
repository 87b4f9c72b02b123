"""`bnpipe serve` as a process: overload answers 503, SIGTERM drains, a model repository as --model,
start-up failures in one line, and no torch in the server."""

from __future__ import annotations

import gc
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from bnpipe.serve.runtime import Model
from bnpipe.serve.server_cli import load, settle_interpreter, switch_interval
from tests.serve_server import BNPIPE, ServerProcess, build_slow_model, running, start, wait_for
from tests.test_serve_support import build_model


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_slow_model(tmp_path_factory.mktemp("slow") / "slow.onnx")


def post_infer(server: ServerProcess, x: np.ndarray) -> tuple[int, dict[str, str], bytes]:
    """One binary V2 request on a fresh connection."""
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    host, port = server.url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", "/v2/models/bnpipe/infer", head + x.tobytes(),
                     {"Inference-Header-Content-Length": str(len(head))})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def metric(server: ServerProcess, name: str) -> float:
    """The sum of a metric's samples, read from /metrics."""
    host, port = server.url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_full_queue_answers_503_at_once(slow_model: Path) -> None:
    """One request runs (~0.1 s), one waits (--max-queue 1); the others are refused with Retry-After."""
    with running("--model", str(slow_model), "--device", "cpu", "--max-batch-size", "1", "--max-queue", "1") as server:
        answers: list[tuple[int, dict[str, str], bytes]] = []
        threads = [threading.Thread(target=lambda: answers.append(post_infer(server, np.zeros((1, 1, 28, 28),
                                                                                             np.uint8))))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        statuses = sorted(status for status, _, _ in answers)
        assert len(answers) == 6 and statuses[0] == 200 and statuses[-1] == 503, statuses
        refused = [(h, b) for s, h, b in answers if s == 503]
        assert all(h["retry-after"] == "1" and "the queue is full" in json.loads(b)["error"] for h, b in refused)
        assert post_infer(server, np.zeros((1, 1, 28, 28), np.uint8))[0] == 200  # and it recovers


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(slow_model: Path) -> None:
    server = start("--model", str(slow_model), "--device", "cpu", "--max-batch-size", "1")
    try:
        n = 6
        x = np.random.default_rng(0).integers(0, 256, (n, 1, 1, 28, 28), dtype=np.uint8)
        reference = Model.load(str(slow_model), "cpu")
        expected = np.concatenate([reference.logits(row) for row in x])  # [n, 10], each run alone as served
        answers: dict[int, np.ndarray | Exception] = {}

        def send(i: int) -> None:
            client = httpclient.InferenceServerClient(server.url, network_timeout=60)
            inputs = [httpclient.InferInput("pixels", [1, 1, 28, 28], "UINT8")]
            inputs[0].set_data_from_numpy(x[i])
            try:
                answers[i] = client.infer("bnpipe", inputs).as_numpy("logits")
            except Exception as exc:  # noqa: BLE001 - recorded: the test fails on it below
                answers[i] = exc

        threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        # Accepted: queued or running (pending), or already answered by the model (inference count).
        assert wait_for(lambda: metric(server, "bnpipe_pending_requests") + metric(
            server, "bnpipe_inference_count_total") == n), "the requests were never all accepted"
        in_flight = metric(server, "bnpipe_pending_requests")
        server.proc.send_signal(signal.SIGTERM)
        host, port = server.url.split(":")
        try:  # a new client sees not-ready (or, once the listener is closed, no server at all)
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", "/v2/health/ready")
            assert conn.getresponse().status == 503
            conn.close()
        except ConnectionRefusedError:
            pass
        for t in threads:
            t.join(60)
        assert server.proc.wait(30) == 0
        assert in_flight >= 2  # the signal came while requests were still queued: the drain was tested
        for i in range(n):
            assert isinstance(answers[i], np.ndarray), answers[i]
            assert np.array_equal(answers[i], expected[i:i + 1])
        assert "Traceback" not in server.stderr()
    finally:
        try:
            server.stop(signal.SIGKILL)
        finally:
            server.close()


def test_model_repository_as_model(tmp_path: Path) -> None:
    from bnpipe.serve.triton_config import tensor_specs, triton_config
    from bnpipe.serve.triton_repo import write_repository

    onnx_file = build_model(tmp_path / "m.onnx")
    model = Model.load(str(onnx_file), "cpu")
    specs = tensor_specs(model.session.get_inputs()), tensor_specs(model.session.get_outputs())
    folder = write_repository(tmp_path / "repo", triton_config("mnist_net", *specs, device="cpu"), onnx_file)
    with running("--model", str(tmp_path / "repo"), "--device", "cpu") as server:
        assert f"serving {folder / '1' / 'model.onnx'} as 'mnist_net'" in server.start_line
        client = httpclient.InferenceServerClient(server.url)
        assert client.get_model_metadata("mnist_net")["versions"] == ["1"]
        x = np.full((2, 1, 28, 28), 7, np.uint8)
        inputs = [httpclient.InferInput("pixels", [2, 1, 28, 28], "UINT8")]
        inputs[0].set_data_from_numpy(x)
        assert np.array_equal(client.infer("mnist_net", inputs).as_numpy("logits"), model.logits(x))
        client.close()


def test_startup_failures_are_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([BNPIPE, "serve", "--model", str(build_model(tmp_path / "m.onnx")), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == f"bnpipe: error: 127.0.0.1:{port}: cannot listen (Address already in use)\n"
    done = subprocess.run([BNPIPE, "serve", "--model", str(tmp_path / "none.onnx"), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr == f"bnpipe: error: {tmp_path / 'none.onnx'}: no such model file\n"


def test_serve_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from bnpipe.serve import server_cli, app, predict_route\n"
        f"state = server_cli.load({str(build_model(tmp_path / 'm.onnx'))!r}, None, 'cpu', 64, 500, 1024, 1 << 20)\n"
        "app.build_app(state)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'torchvision', 'matplotlib'))\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.splitlines()[-1] == "HEAVY []"


def test_switch_interval_is_half_the_batch_delay_within_bounds() -> None:
    assert switch_interval(500e-6) == pytest.approx(250e-6)
    assert switch_interval(0.0) == pytest.approx(50e-6)
    assert switch_interval(1.0) == pytest.approx(0.005)  # never coarser than Python's default


def test_settle_interpreter_freezes_what_exists_and_sets_the_switch_interval() -> None:
    before = sys.getswitchinterval()
    try:
        settle_interpreter(500e-6)
        assert gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == pytest.approx(250e-6)
    finally:
        gc.unfreeze()
        sys.setswitchinterval(before)


def test_load_warms_the_model_up_at_1_and_each_preferred_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = Model.logits
    monkeypatch.setattr(Model, "logits", lambda self, x: sizes.append(len(x)) or real(self, x))
    load(str(build_model(tmp_path / "m.onnx")), None, "cpu", max_batch=100, max_delay_us=500, max_queue=200,
         max_body=1 << 20)
    assert sizes == [1, 16, 64, 100]  # before any request: 1, then 16, 64, ... below the maximum, and the maximum
