"""Helpers for the `bnpipe serve` tests (no tests here): a server subprocess on a free port, stopped
by its own pid, and a deliberately slow model that keeps the export contract."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import IO
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from tests.test_serve_support import LABELS, LAYOUT

BNPIPE = str(Path(sys.executable).parent / "bnpipe")  # the venv's console script
START_TIMEOUT = 60.0


class ServerProcess:
    """A running `bnpipe serve`; ``url`` is host:port as tritonclient takes it."""

    def __init__(self, proc: subprocess.Popen[str], url: str, start_line: str, err_file: IO[str]) -> None:
        self.proc, self.url, self.start_line, self._err = proc, url, start_line, err_file

    def stderr(self) -> str:
        """Everything the server wrote to stderr so far (a file, not a pipe: a full pipe would block it)."""
        self._err.seek(0)
        return self._err.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server (its own pid) and wait for it; kill it if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def close(self) -> None:
        """Close the stderr file and the stdout pipe, once the server has stopped."""
        self._err.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start(*args: str) -> ServerProcess:
    """Start `bnpipe serve --port 0 ARGS` and read the port from its one start line."""
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([BNPIPE, "serve", "--host", "127.0.0.1", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=err, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if "http://" not in line:
        proc.kill()
        proc.wait(10)
        err.seek(0)
        why = err.read()[-2000:]
        err.close()
        raise AssertionError(f"bnpipe serve did not start: {line!r} {why}")
    url = line.split("http://", 1)[1].split()[0]
    return ServerProcess(proc, url, line.rstrip("\n"), err)


@contextmanager
def running(*args: str) -> Iterator[ServerProcess]:
    """A server for the ``with`` block; stopped by SIGTERM, which must exit 0 with nothing on stderr."""
    server = start(*args)
    try:
        yield server
    except BaseException:
        try:
            with suppress(subprocess.TimeoutExpired):  # the block's own failure is the one to report
                server.stop()
        finally:
            server.close()
        raise
    try:
        status = server.stop()
        err = server.stderr()
    finally:
        server.close()
    assert status == 0 and "Traceback" not in err, err[-2000:]


def build_slow_model(path: Path, depth: int = 48, width: int = 256) -> Path:
    """A model of the contract whose run takes a good fraction of a second per image.

    pixels [N, 1, 28, 28] -> x [N, 1, 784] -> expanded to [N, width, 784] -> tanh(x @ A) ``depth``
    times (A [784, 784] orthogonal, so nothing saturates) -> mean over width [N, 784] -> @ W [784, 10].
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((784, 784)))
    init = [numpy_helper.from_array(q.astype(np.float32), "A"),
            numpy_helper.from_array((rng.standard_normal((784, 10)) * 0.05).astype(np.float32), "W"),
            numpy_helper.from_array(np.array([-1, 1, 784], np.int64), "flat_shape"),
            numpy_helper.from_array(np.array([1, width, 1], np.int64), "wide"),
            numpy_helper.from_array(np.array(1 / 255, np.float32), "scale")]
    nodes = [helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "scale"], ["u"]), helper.make_node("Reshape", ["u", "flat_shape"], ["r"]),
             helper.make_node("Expand", ["r", "wide"], ["x0"])]
    for i in range(depth):
        nodes += [helper.make_node("MatMul", [f"x{i}", "A"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"x{i + 1}"])]
    nodes += [helper.make_node("ReduceMean", [f"x{depth}"], ["mean"], axes=[1], keepdims=0),
              helper.make_node("MatMul", ["mean", "W"], ["logits"])]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("pixels", TensorProto.UINT8,
                                                                           ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    helper.set_model_props(model, {"labels": json.dumps(LABELS), "input_layout": json.dumps(LAYOUT)})
    onnx.save(model, str(path))
    return path


def wait_for(predicate, timeout: float = 10.0, step: float = 0.01) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False
