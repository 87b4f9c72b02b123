"""The servers benchmarks/serve.py compares bnpipe serve with (run by it, not by hand).

``python serve_peers.py bare PORT``: the HTTP stack's ceiling, a bare Starlette app on uvicorn
(uvloop, httptools: bnpipe serve's stack) that parses the V2 request (JSON header, binary tensor)
and answers fixed bytes, running no model.

``.venv-pytriton/bin/python serve_peers.py triton MODEL PORT THREADS DEVICE PARALLEL_ROWS``: NVIDIA Triton
Inference Server from the pip package nvidia-pytriton (its own venv: it pins numpy<2), serving MODEL
through an onnxruntime session (CUDA when DEVICE is cuda, else the CPU) in its bound Python callable, with dynamic batching (max batch 256,
500 us queue delay, as bnpipe serve's defaults). As bnpipe's `Model` does on the CPU, a batch under
PARALLEL_ROWS rows runs on a second, one-thread session. HTTP on PORT, gRPC on PORT+1, metrics on PORT+2.
"""

from __future__ import annotations

import json
import sys

MAX_BATCH, DELAY_US = 256, 500


def bare(port: int) -> None:
    import numpy as np
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    header = json.dumps({"model_name": "bnpipe", "model_version": "1", "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [1, 10], "parameters": {"binary_data_size": 40}}]}).encode()
    fixed = header + bytes(40)
    length = {"Inference-Header-Content-Length": str(len(header))}

    async def infer(request: Request) -> Response:
        body = await request.body()
        size = int(request.headers.get("inference-header-content-length", len(body)))
        tensor = json.loads(body[:size])["inputs"][0]
        np.frombuffer(body, np.uint8, tensor["parameters"]["binary_data_size"], size).reshape(tensor["shape"])
        return Response(fixed, headers=length, media_type="application/octet-stream")

    async def ready(request: Request) -> Response:
        return Response(b"")

    app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"]),
                            Route("/v2/models/{name}/ready", ready)])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False)


def triton(model: str, port: int, threads: int, device: str, parallel_rows: int) -> None:
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    def open_session(intra_op: int, providers: list[str]) -> ort.InferenceSession:
        options = ort.SessionOptions()  # as bnpipe's Model.load
        options.intra_op_num_threads = intra_op
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model, options, providers=providers)

    cpu = ["CPUExecutionProvider"]
    session = open_session(threads, ["CUDAExecutionProvider", *cpu] if device == "cuda" else cpu)
    small = open_session(1, cpu) if device != "cuda" and threads > 1 else session

    @batch
    def infer(pixels: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": (small if len(pixels) < parallel_rows else session).run(["logits"], {"pixels": pixels})[0]}

    config = TritonConfig(http_address="127.0.0.1", http_port=port, grpc_address="127.0.0.1", grpc_port=port + 1,
                          metrics_port=port + 2, log_verbose=0)
    with Triton(config=config) as server:
        server.bind(model_name="bnpipe", infer_func=infer,
                    inputs=[Tensor(name="pixels", dtype=np.uint8, shape=(1, 28, 28))],
                    outputs=[Tensor(name="logits", dtype=np.float32, shape=(10,))],
                    config=ModelConfig(max_batch_size=MAX_BATCH,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=DELAY_US)))
        server.serve()


if __name__ == "__main__":
    if sys.argv[1] == "bare":
        bare(int(sys.argv[2]))
    else:
        triton(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
