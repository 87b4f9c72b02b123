"""The onnxruntime session: which execution provider runs it, and running batches through it.

The decisions are pure functions (`plan_providers`, `provider_that_ran`, `check_contract`) so
that the tests can drive them with any list of providers; `Model.load` only wires them to the
real onnxruntime.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnpipe.contract import INPUT_NAME, OUTPUT_NAME, input_layout
from bnpipe.errors import BnpipeError, one_line

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")
# What serve feeds the model; the model's `input_layout` metadata must say exactly this.
EXPECTED_LAYOUT = input_layout()
# cuDNN's default EXHAUSTIVE search benchmarks every conv algorithm on the first run (seconds);
# TF32 (on by default on Ampere and later) would round the convs' inputs to 10 mantissa bits.
CUDA_OPTIONS = {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}
# Batches under this many rows run on one intra-op thread. Without spinning, every parallel op
# wakes the other threads for microseconds of work, so one thread costs 0.5-0.7x the CPU time of two
# at every size, and up to 16 rows it is faster too. 2 CPUs, three runs of benchmarks/ort_threads.py,
# wall time of one thread over two: 0.61-0.62 at 1 row, 0.74-0.77 at 8, 0.82-1.01 at 16, 0.90-1.35
# at 32, 0.99-1.45 at 64, 1.15-1.18 at 128. A server's batches grow under load, when CPU is what
# runs short; from 64 rows the threads' wall time pays. 3-4 threads are not measured here.
PARALLEL_ROWS = 64


def plan_providers(device: str, available: Sequence[str], gpu_count: int) -> list[str]:
    """Choose the execution providers to ask onnxruntime for.

    Args:
        device: ``auto``, ``cuda`` or ``cpu``.
        available: ``onnxruntime.get_available_providers()`` (what the build has, not what works).
        gpu_count: CUDA devices the driver reports (`bnpipe.serve.cuda.cuda_device_count`).

    Returns:
        Providers in priority order; CUDA first only when it was built in and a GPU exists.

    Raises:
        BnpipeError: ``cuda`` was asked for and cannot be had.
    """
    if device not in DEVICES:
        raise BnpipeError(f"--device {device}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return [CPU]
    if device == "cuda" and CUDA not in available:
        raise BnpipeError("--device cuda: this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)")
    if device == "cuda" and gpu_count < 1:
        raise BnpipeError("--device cuda: no usable GPU (the NVIDIA driver reports no CUDA device)")
    return [CUDA, CPU] if CUDA in available and gpu_count > 0 else [CPU]


def provider_that_ran(device: str, session_providers: Sequence[str]) -> str:
    """Return the provider that really runs a session, given ``session.get_providers()``.

    onnxruntime silently drops a provider that fails to start (missing cuDNN, a driver too
    old), so only the created session can say what runs. ``cuda`` never falls back to the CPU.

    Raises:
        BnpipeError: ``cuda`` was asked for but the session runs on something else.
    """
    ran = session_providers[0] if session_providers else CPU
    if device == "cuda" and ran != CUDA:
        raise BnpipeError(f"--device cuda: the CUDA execution provider failed to start; "
                          f"the session would run on {ran}")
    return ran


def _json_field(metadata: Mapping[str, str], key: str, model: str) -> Any:
    try:
        return json.loads(metadata[key])
    except KeyError:
        raise BnpipeError(f"{model}: no '{key}' in the model's metadata; write it with `bnpipe export`") from None
    except ValueError:
        raise BnpipeError(f"{model}: metadata '{key}' is not valid JSON") from None


def _one_tensor(specs: Sequence[tuple[str, str, list[Any]]], name: str, dtype: str, tail: list[int]) -> bool:
    """Whether ``specs`` is exactly one tensor ``name`` of ``dtype`` shaped [batch, *tail]."""
    return len(specs) == 1 and specs[0][0] == name and specs[0][1] == dtype and list(specs[0][2])[1:] == tail


def check_contract(model: str, inputs: Sequence[tuple[str, str, list[Any]]],
                   outputs: Sequence[tuple[str, str, list[Any]]], metadata: Mapping[str, str]) -> list[str]:
    """Check that a model takes what serve feeds it and gives what serve reads.

    Args:
        model: The model's path, for messages.
        inputs: (name, type, shape) of each graph input, e.g.
            ("pixels", "tensor(uint8)", ["batch", 1, 28, 28]).
        outputs: (name, type, shape) of each graph output.
        metadata: The model's metadata_props.

    Returns:
        The class labels, in the order of the logits.

    Raises:
        BnpipeError: the metadata or the graph do not match the contract.
    """
    layout = _json_field(metadata, "input_layout", model)
    if layout != EXPECTED_LAYOUT:
        raise BnpipeError(f"{model}: input layout {json.dumps(layout)} is not what serve feeds, "
                          f"{json.dumps(EXPECTED_LAYOUT)}")
    if not _one_tensor(inputs, INPUT_NAME, "tensor(uint8)", [1, 28, 28]):
        raise BnpipeError(f"{model}: graph inputs {list(inputs)} do not match its input_layout "
                          f"(one uint8 '{INPUT_NAME}' of shape [batch, 1, 28, 28])")
    labels = _json_field(metadata, "labels", model)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise BnpipeError(f"{model}: metadata 'labels' is not a list of strings")
    if not _one_tensor(outputs, OUTPUT_NAME, "tensor(float)", [len(labels)]):
        raise BnpipeError(f"{model}: graph outputs {list(outputs)} are not one float '{OUTPUT_NAME}' "
                          f"of shape [batch, {len(labels)}]")
    return labels


def usable_cpus() -> int:
    """Return how many CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def intra_op_threads() -> int:
    """Threads for one session: the CPUs this process may use (a small net gains nothing past 4)."""
    return max(1, min(4, usable_cpus()))


@dataclass
class Model:
    """A loaded model: its sessions, labels and metadata, and the provider that runs it.

    ``session`` has the intra-op threads asked for and reads the model's metadata; on the CPU with
    several threads, ``small`` (one thread) runs the batches under `PARALLEL_ROWS` rows.
    """

    path: str
    session: Any  # onnxruntime.InferenceSession
    labels: list[str]
    metadata: dict[str, str]
    provider: str
    small: Any = None  # a one-thread session for batches under PARALLEL_ROWS rows (CPU, several threads)

    @classmethod
    def load(cls, path: str, device: str = "auto", verbose: bool = False, threads: int | None = None) -> Model:
        """Create the onnxruntime session for ``path`` on ``device`` and check the model contract.

        Args:
            path: The ONNX file.
            device: ``auto``, ``cuda`` or ``cpu`` (see `plan_providers`).
            verbose: Let onnxruntime log warnings (a CUDA provider that fails to start says why).
            threads: Intra-op threads on the CPU for batches of `PARALLEL_ROWS` rows or more (smaller
                ones run on one); None takes `intra_op_threads`.

        Raises:
            BnpipeError: the model is missing, not ONNX, corrupt, or breaks the contract, or the
                device cannot be had.
        """
        if not os.path.isfile(path):
            raise BnpipeError(f"{path}: no such model file" if not os.path.exists(path) else f"{path}: not a file")
        import onnxruntime as ort

        from bnpipe.serve import cuda

        gpus = cuda.cuda_device_count() if device != "cpu" else 0
        providers = plan_providers(device, ort.get_available_providers(), gpus)
        if CUDA in providers:
            cuda.preload_cuda_libraries()
        ort.set_default_logger_severity(2 if verbose else 4)  # a CUDA start failure is reported by us
        threads = threads or intra_op_threads()

        def open_session(intra_op: int, providers: list[str]) -> Any:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = intra_op
            options.inter_op_num_threads = 1  # the graph is a chain: nothing runs side by side
            options.log_severity_level = 2 if verbose else 4
            # Idle ORT threads would spin and take the cores that decode images between batches.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            provider_options = [CUDA_OPTIONS if p == CUDA else {} for p in providers]
            try:
                return ort.InferenceSession(path, sess_options=options, providers=providers,
                                            provider_options=provider_options)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
                raise BnpipeError(f"{path}: not a usable ONNX model ({one_line(exc)})") from None

        session = open_session(threads, providers)
        provider = provider_that_ran(device, session.get_providers())
        metadata = dict(session.get_modelmeta().custom_metadata_map)
        labels = check_contract(path, [(a.name, a.type, a.shape) for a in session.get_inputs()],
                                [(a.name, a.type, a.shape) for a in session.get_outputs()], metadata)
        # Made now, from the same file, so both sessions hold the same model (~2 ms).
        small = open_session(1, [CPU]) if provider == CPU and threads > 1 else None
        return cls(path, session, labels, metadata, provider, small)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Run one batch: ``pixels`` [N, 1, 28, 28] uint8 -> logits [N, classes] float32."""
        if self.provider == CUDA:
            # IO binding: ORT copies the batch to the GPU once and writes the logits to host memory.
            binding = self.session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(pixels))
            binding.bind_output(OUTPUT_NAME, "cpu")
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        session = self.small if self.small is not None and len(pixels) < PARALLEL_ROWS else self.session
        return session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


class FixedRows:
    """Runs every batch as ``rows`` rows, the batch's own first and zeros after: one input shape for all runs.

    On CUDA, onnxruntime plans each conv for the last input shape it saw. A run whose batch size
    differs from the previous run's re-plans them: 4 ms per run on an H200 when the size cycles
    through 1..8 (23 ms with EXHAUSTIVE search), against 0.19 ms for every run at 256 rows
    (``benchmarks/ort_shapes.py``). The rows of this net do not mix, so the padding changes nothing
    in a batch's own rows. Called from one thread at a time (the batcher's worker).
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], rows: int) -> None:
        if rows < 1:
            raise ValueError(f"rows must be at least 1, got {rows}")
        self.run, self.rows = run, rows
        self._buffer: np.ndarray | None = None  # [rows, ...] the padded batch
        self._used = 0  # rows of the buffer that may hold a previous batch

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels`` [n <= rows, ...] -> the model's output for those n rows."""
        n = len(pixels)
        if n > self.rows:
            raise ValueError(f"{n} rows do not fit a run of {self.rows}")
        if self._buffer is None or self._buffer.shape[1:] != pixels.shape[1:] or self._buffer.dtype != pixels.dtype:
            self._buffer, self._used = np.zeros((self.rows, *pixels.shape[1:]), pixels.dtype), 0
        self._buffer[:n] = pixels
        self._buffer[n:self._used] = 0
        self._used = n
        return self.run(self._buffer)[:n]
