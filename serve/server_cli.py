"""`bnpipe serve`: the model behind Triton's HTTP/REST protocol (KServe V2), with dynamic batching.

`load` prepares everything (model, warm-up, socket) and `serve_forever` runs uvicorn until
SIGTERM or SIGINT, then drains: ready answers 503, requests in flight are answered, exit 0.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING

import click

from bnpipe.serve.runtime import DEVICES

if TYPE_CHECKING:  # the app's modules load only when serving: `bnpipe serve --help` stays fast
    from bnpipe.serve.app import ServeState

DEFAULT_MODEL = "models/bn_convnet.onnx"
PYTHON_SWITCH_INTERVAL = 0.005  # seconds: CPython's default (sys.getswitchinterval)


def resolve_model(path: str, name: str | None) -> tuple[str, str, str]:
    """``--model`` as (ONNX file, model name, version): a file, or a Triton model repository folder."""
    if os.path.isdir(path):
        from bnpipe.serve.triton_repo import find_model

        found = find_model(path)
        return str(found.onnx_path), name or found.name, str(found.version)
    return path, name or "bnpipe", "1"


def listen(host: str, port: int) -> socket.socket:
    """Bind and listen before anything slow, so that a taken port fails at once, with one line."""
    from bnpipe.errors import BnpipeError

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as exc:
        raise BnpipeError(f"{host}:{port}: cannot listen ({getattr(exc, 'strerror', None) or exc})") from None
    sock.set_inheritable(True)
    return sock


def load(model_path: str, name: str | None, device: str, max_batch: int, max_delay_us: int, max_queue: int,
         max_body: int, threads: int | None = None) -> ServeState:
    """Load the model, warm it up at each preferred batch size, and build the app's state."""
    import numpy as np

    from bnpipe.errors import BnpipeError
    from bnpipe.serve.app import ServeState
    from bnpipe.serve.batcher import Batcher
    from bnpipe.serve.metrics import Metrics
    from bnpipe.serve.runtime import CUDA, FixedRows, Model
    from bnpipe.serve.triton_config import tensor_specs, triton_config

    if max_queue < max_batch:
        raise BnpipeError(f"--max-queue {max_queue} is below --max-batch-size {max_batch}: no full batch could wait")
    onnx_path, model_name, version = resolve_model(model_path, name)
    model = Model.load(onnx_path, device, threads=threads)
    inputs, outputs = tensor_specs(model.session.get_inputs()), tensor_specs(model.session.get_outputs())
    config = triton_config(model_name, inputs, outputs, max_batch_size=max_batch, max_queue_delay_us=max_delay_us,
                           device="gpu" if model.provider == CUDA else "cpu")
    # On CUDA every run has max_batch rows: onnxruntime re-plans its convs for each new batch size.
    run = FixedRows(model.logits, max_batch) if model.provider == CUDA else model.logits
    # The sizes Triton warms up too, so that the first client request is not slow; padded, one shape is all.
    sizes = [max_batch] if model.provider == CUDA else [w["batch_size"] for w in config["model_warmup"]]
    for size in sizes:
        run(np.zeros((size, *inputs[0].shape[1:]), np.uint8))
    batcher = Batcher(run, max_batch, max_delay_us / 1e6, max_queue)
    metrics = Metrics(model_name, max_batch, pending=lambda: batcher.busy)
    batcher.on_batch = metrics.batch
    return ServeState(model, model_name, version, inputs, outputs, config, batcher, metrics, max_body)


def switch_interval(max_delay: float) -> float:
    """The GIL switch interval to serve with: half the batch delay, from 50 us up to Python's 5 ms.

    The event loop holds the GIL while it is busy; the batcher's thread, woken at its deadline or
    back from ``session.run``, waits up to one interval for it. At the default 5 ms that wait
    dwarfed the 500 us batch delay.
    """
    return min(PYTHON_SWITCH_INTERVAL, max(5e-5, max_delay / 2))


def settle_interpreter(max_delay: float) -> None:
    """Tune the interpreter for serving, once everything long-lived (modules, model, app) exists.

    ``gc.freeze`` takes those objects out of the collector's reach: a full collection no longer
    walks them (it paused the server 15 to 27 ms every few seconds under load, stalling every
    request in flight). Then the switch interval is set (`switch_interval`).
    """
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(switch_interval(max_delay))


def serve_forever(state: ServeState, sock: socket.socket, url: str) -> None:
    """Run the server on ``sock`` until SIGTERM or SIGINT; return once it has drained."""
    import uvicorn

    from bnpipe.serve.app import build_app

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # uvicorn re-raises a captured signal after shutdown (exit status -15); a drained
            # server exits 0 instead, so the signal is not recorded. Ready answers 503 at once.
            state.ready = False
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                settle_interpreter(state.batcher.max_delay)
                click.echo(f"bnpipe: serving {state.model.path} as '{state.name}' on {state.model.provider} "
                           f"at {url} (max batch {state.batcher.max_batch}, ready)")

    config = uvicorn.Config(build_app(state), loop=_have("uvloop", "asyncio"), http=_have("httptools", "h11"),
                            lifespan="on", log_level="warning", access_log=False, timeout_graceful_shutdown=30,
                            server_header=False, proxy_headers=False)  # no client addresses used: no access log
    Server(config).run(sockets=[sock])


def _have(module: str, fallback: str) -> str:
    import importlib.util

    return module if importlib.util.find_spec(module) is not None else fallback


@click.command()
@click.option("--model", "model_path", default=DEFAULT_MODEL, show_default=True,
              help="ONNX file written by `bnpipe export`, or a Triton model repository (`export --triton-repo`).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0 picks a free one (the start line says which).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto: CUDA when onnxruntime can use a GPU, else the CPU. cuda never falls back.")
@click.option("--name", default=None, help="Model name in the URLs [default: the repository's, else bnpipe].")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per onnxruntime run, at most. On CUDA every run is padded to this many "
                   "(one input shape), so a large value costs a lone request more.")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=500, show_default=True,
              help="The longest a request waits for others to join its batch, in microseconds.")
@click.option("--max-queue", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Images waiting, at most; past it requests get 503.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="onnxruntime intra-op threads on the CPU for batches of 64 images or more (smaller ones "
                   "run on one); 0: one per usable CPU, at most 4.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=64 << 20, show_default=True,
              help="Largest request body, before and after inflating; past it 413.")
def serve(model_path: str, host: str, port: int, device: str, name: str | None, max_batch_size: int,
          max_queue_delay_us: int, max_queue: int, threads: int, max_body_bytes: int) -> None:
    """Serve the model over HTTP with Triton's protocol (KServe V2), batching concurrent requests.

    Routes: /v2/health/{live,ready}, /v2, /v2/models/NAME[/versions/1][/ready|/config|/infer],
    POST /v1/predict (an image in, `bnpipe predict --json` out), GET / (a page to draw a digit),
    /metrics (Prometheus). SIGTERM or SIGINT: stop taking requests, answer those in flight, exit 0.
    """
    sock = listen(host, port)
    state = load(model_path, name, device, max_batch_size, max_queue_delay_us, max_queue, max_body_bytes,
                 threads or None)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    serve_forever(state, sock, f"http://{shown}:{bound}")
    sys.stdout.flush()
