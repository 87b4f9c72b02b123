"""The Starlette app: Triton's HTTP/REST routes (KServe V2), bnpipe's own routes, and metrics.

Handlers only parse, queue and encode; the model runs in the batcher's worker thread. Every
refusal is ``{"error": "..."}`` with the status code Triton uses (`bnpipe.serve.v2.V2Error`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from bnpipe import __version__
from bnpipe.errors import one_line
from bnpipe.serve import bodies
from bnpipe.serve.batcher import Batcher, QueueFull, Stopped
from bnpipe.serve.metrics import CONTENT_TYPE, Metrics
from bnpipe.serve.runtime import Model
from bnpipe.serve.triton_config import TensorSpec
from bnpipe.serve.header_cache import HeaderCache
from bnpipe.serve.v2 import V2Error, parse_infer
from bnpipe.serve.v2_answers import encode_infer, error_body, model_metadata, server_metadata

EXTENSIONS = ("binary_tensor_data", "model_configuration")
PAGE = Path(__file__).parent / "static" / "index.html"
RETRY_AFTER = "1"  # seconds: a full queue drains in milliseconds
JSON = "application/json"
LARGE_BODY = 1 << 18  # bytes
CLIENT_CLOSED = 499  # nginx's status for a client that closed its connection mid-request, in the metrics


@dataclass
class ServeState:
    """Everything the handlers share: the model, its protocol description, batching and limits."""

    model: Model
    name: str
    version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    config: dict[str, Any]  # Triton's model configuration (`triton_config`), for GET .../config
    batcher: Batcher
    metrics: Metrics
    max_body: int
    ready: bool = True  # False from the first SIGTERM or SIGINT on: ready and infer answer 503


def error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    """A Triton-style error answer."""
    if status == 503:
        headers = {"Retry-After": RETRY_AFTER, **(headers or {})}
    return Response(error_body(message), status, headers, JSON)


def ok_json(content: Any) -> Response:
    """A 200 answer with ``content`` as JSON."""
    return Response(json.dumps(content).encode(), 200, media_type=JSON)


def _model(state: ServeState, request: Request) -> None:
    """Check the path's model name and version against the one served (404 otherwise)."""
    name = request.path_params["name"]
    if name != state.name:
        raise V2Error(f"Request for unknown model: '{name}' is not found", 404)
    version = request.path_params.get("version")
    if version not in (None, "", state.version):
        raise V2Error(f"Request for unknown model: '{name}' version {version} is not found", 404)


def _unavailable(state: ServeState) -> V2Error | None:
    return None if state.ready else V2Error("the server is shutting down and takes no new requests", 503)


async def _body(state: ServeState, request: Request) -> bytes:
    """The request body, within --max-body-bytes before and after inflating."""
    data = await bodies.read_body(request.stream(), request.headers.get("content-length"), state.max_body)
    encoding = request.headers.get("content-encoding")
    # Inflating takes up to ~0.1 s before a bomb meets the limit: off the event loop.
    return data if encoding is None else await run_in_threadpool(bodies.inflate, data, encoding, state.max_body)


async def _infer_rows(state: ServeState, pixels: np.ndarray) -> np.ndarray:
    """Run rows through the batcher; a full queue or a shutdown is a 503."""
    try:
        future = state.batcher.submit(pixels)
    except (QueueFull, Stopped) as exc:
        raise V2Error(str(exc), 503) from None
    return await future


def _answer(request: Request, body: bytes, media_type: str, headers: dict[str, str] | None = None) -> Response:
    """A 200 answer, compressed when the client's Accept-Encoding asks for gzip or deflate."""
    headers = headers or {}
    encoding = bodies.accepted_encoding(request.headers.get("accept-encoding"))
    if encoding is not None:
        body = bodies.compress(body, encoding)
        headers["Content-Encoding"] = encoding
    return Response(body, 200, headers, media_type)


def build_app(state: ServeState) -> ASGIApp:
    """The ASGI app serving ``state``'s model. The batcher starts and stops with the app's lifespan."""

    header_cache = HeaderCache(state.name, state.inputs, state.outputs, state.batcher.max_batch)

    def route(path: str, fn: Callable[[ServeState, Request], Awaitable[Response]], method: str) -> Route:
        count = state.metrics.request

        async def endpoint(request: Request) -> Response:
            try:
                response = await fn(state, request)
            except V2Error as exc:
                response = error(str(exc), exc.status)
            except ClientDisconnect:  # gone before its body arrived: no answer can reach it, nothing of ours failed
                response = Response(b"", CLIENT_CLOSED)
            except Exception as exc:  # noqa: BLE001 - a fault of ours: one line in the log and the answer
                message = f"internal error: {one_line(exc)}"
                print(f"bnpipe: error: {request.method} {request.url.path[:200]}: {message}", file=sys.stderr)
                response = error(message, 500)
            count(path, method, response.status_code)
            return response

        return Route(path, endpoint, methods=[method])

    async def live(state: ServeState, request: Request) -> Response:
        return Response(b"", 200)

    async def ready(state: ServeState, request: Request) -> Response:
        return Response(b"", 200) if state.ready else error("the server is not ready", 503)

    async def server(state: ServeState, request: Request) -> Response:
        return ok_json(server_metadata("bnpipe", __version__, EXTENSIONS))

    async def metadata(state: ServeState, request: Request) -> Response:
        _model(state, request)
        platform = state.config.get("platform", "onnxruntime_onnx")
        return ok_json(model_metadata(state.name, state.version, platform, state.inputs, state.outputs))

    async def model_ready(state: ServeState, request: Request) -> Response:
        _model(state, request)
        return Response(b"", 200) if state.ready else error(f"model '{state.name}' is not ready", 503)

    async def config(state: ServeState, request: Request) -> Response:
        _model(state, request)
        return ok_json(state.config)

    async def infer(state: ServeState, request: Request) -> Response:
        _model(state, request)
        if (refusal := _unavailable(state)) is not None:
            raise refusal
        raw = request.headers.get("inference-header-content-length")
        json_size = None if raw is None else bodies.decimal(raw)
        if raw is not None and json_size is None:
            raise V2Error(f"Inference-Header-Content-Length {raw[:40]!r} is not a number")
        body = await _body(state, request)
        # A large JSON body takes a while to parse: off the event loop, so that others are not held up.
        parsed = (header_cache.parse(body, json_size) if len(body) < LARGE_BODY else
                  await run_in_threadpool(parse_infer, body, json_size, *header_cache.spec))
        logits = await _infer_rows(state, parsed.inputs[state.inputs[0].name])
        results = {state.outputs[0].name: logits}
        content, header_length = encode_infer(state.name, state.version, parsed.id,
                                              [(n, results[n], binary) for n, binary in parsed.outputs])
        if header_length is None:
            return _answer(request, content, JSON)
        return _answer(request, content, "application/octet-stream",
                       {"Inference-Header-Content-Length": str(header_length)})

    async def predict(state: ServeState, request: Request) -> Response:
        from bnpipe.serve.predict_route import predict_image  # Pillow: only when an image comes

        if (refusal := _unavailable(state)) is not None:
            raise refusal
        body = await _body(state, request)
        status, answer = await predict_image(request, body, lambda rows: _infer_rows(state, rows), state.model.labels)
        return Response(answer, status, media_type=JSON)

    async def page(state: ServeState, request: Request) -> Response:
        if not PAGE.is_file():
            raise V2Error(f"the page {PAGE.name} is not installed", 404)
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    async def metrics(state: ServeState, request: Request) -> Response:
        return Response(state.metrics.render(), 200, media_type=CONTENT_TYPE)

    model_routes = [("/infer", infer, "POST"), ("", metadata, "GET"), ("/ready", model_ready, "GET"),
                    ("/config", config, "GET")]
    routes = [route(base + tail, fn, method) for tail, fn, method in model_routes  # infer first: matched first
              for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")]
    routes += [route("/v2/health/live", live, "GET"), route("/v2/health/ready", ready, "GET"),
               route("/v2", server, "GET"), route("/v1/predict", predict, "POST"), route("/", page, "GET"),
               route("/metrics", metrics, "GET")]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        import asyncio

        state.batcher.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            state.batcher.stop()

    async def http_error(request: Request, exc: Exception) -> Response:
        """The router's own refusals: 404 for no route, 405 for a route's wrong method."""
        assert isinstance(exc, HTTPException)
        matched = request.scope.get("route")
        state.metrics.request(matched.path if matched is not None else "unmatched", request.method, exc.status_code)
        return error(exc.detail if exc.status_code != 404 else f"no route {request.url.path[:200]}",
                     exc.status_code, dict(exc.headers or {}))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    infer_routes = [r for r in routes if r.path.endswith("/infer")]

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        # The hot path: a POST to .../infer goes straight to its endpoint, past Starlette's
        # middleware and router, whose layers cost more CPU per request than the V2 parse. The
        # endpoint answers every error itself; everything else (a GET there: 405) goes through Starlette.
        for infer_route in infer_routes:
            match, child_scope = infer_route.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope, app=app)
                response = await infer_route.endpoint(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return asgi

