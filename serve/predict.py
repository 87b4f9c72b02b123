"""Batch prediction: decode the inputs in parallel, one `session.run` per batch, and `run`, the
whole of `bnpipe predict` (streams, ordering, exit status) as a function the tests call.

Every input yields exactly one `Prediction`, in input order: a label and its probability, or
the reason it could not be read. A bad image never stops the others.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TextIO

import numpy as np

from bnpipe.errors import BnpipeError, discard_stream, output_error
from bnpipe.serve.image import load_digits
from bnpipe.serve.inputs import STDIN, Item, expand_inputs
from bnpipe.serve.output import json_line, text_lines
from bnpipe.serve.runtime import Model, usable_cpus

PARALLEL_MIN = 512  # below this many images a worker pool costs more than it saves
# On 2 CPUs, with a plain PNG decoding in ~15 us, decode workers measured no faster than none for
# 10,000 images and slower for 2,000-4,000: onnxruntime's threads need both cores as it is.
FEW_CPUS = 2


@dataclass
class Prediction:
    """The result for one input: ``label``/``probability``/``top_k``, or ``error``."""

    path: str
    label: str | None = None
    probability: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def decode_batch(items: Sequence[Item]) -> tuple[np.ndarray, dict[int, str]]:
    """Decode a batch of inputs into model input (`bnpipe.serve.image.load_digits`).

    Returns:
        pixels [M, 28, 28] uint8 for the M good items in order, and {index in ``items``:
        reason} for the others.
    """
    errors = {i: item.error for i, item in enumerate(items) if item.error is not None}
    todo = [i for i in range(len(items)) if i not in errors] if errors else range(len(items))
    pixels, failed = load_digits([items[i].source for i in todo], [items[i].name for i in todo])
    errors.update((todo[j], reason) for j, reason in failed.items())
    return pixels, errors


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [N, C] logits, computed in float64 to keep tiny probabilities exact."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)  # exp of the largest is 1: no overflow
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def rank(probs: np.ndarray, labels: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Return, per row of ``probs`` [N, C], the ``k`` most probable (label, probability), best first.

    Ties keep the lower class index first (a stable sort), so results are deterministic.
    """
    k = max(1, min(k, probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(labels[c], float(row[c])) for c in cols] for row, cols in zip(probs, order)]


def batches(items: Sequence[Item], size: int) -> list[Sequence[Item]]:
    """Split ``items`` into consecutive batches of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def default_workers(n_items: int) -> int:
    """Decode processes for ``n_items`` images: none for small jobs or on FEW_CPUS, else half the CPUs."""
    cpus = usable_cpus()
    return 0 if n_items < PARALLEL_MIN or cpus <= FEW_CPUS else cpus // 2


@contextlib.contextmanager
def decoding_pool(n_items: int, workers: int | None = None) -> Iterator[Any]:
    """Yield a process pool that decodes images, or None when decoding stays in-process.

    Processes, not threads: decoding a small PNG is mostly Python inside Pillow, which holds
    the GIL (two threads decode slower than one). Open the pool before `Model.load`: fork
    copies only the calling thread, so the children must exist before onnxruntime starts its
    threads, and they can decode while it loads. Forked, they start with numpy and Pillow
    already imported (a spawned worker would spend ~0.2 s importing them).

    Args:
        n_items: How many images there are.
        workers: Processes; None picks `default_workers`; 0 means none.
    """
    count = default_workers(n_items) if workers is None else workers
    if count < 1:
        yield None
        return
    import multiprocessing  # only here: it costs a single-image run ~10 ms to import

    if "fork" not in multiprocessing.get_all_start_methods():  # Windows
        yield None
        return
    with multiprocessing.get_context("fork").Pool(count) as pool:
        yield pool


def decode_batches(items: Sequence[Item], batch_size: int = 256,
                   pool: Any = None) -> Iterator[tuple[Sequence[Item], np.ndarray, dict[int, str]]]:
    """Decode ``items`` in batches, yielding (batch, pixels [M, 28, 28], {index: reason}) in order.

    With a pool (from `decoding_pool`) every batch is handed to the workers at once, so call
    this before `Model.load`: the images decode while the session (and CUDA) starts up. Without
    one, each batch is decoded in-process when it is asked for.
    """
    chunks = batches(items, batch_size)
    decoded = map(decode_batch, chunks) if pool is None else pool.imap(decode_batch, chunks)
    return ((chunk, pixels, errors) for chunk, (pixels, errors) in zip(chunks, decoded))


def predict(model: Model, decoded: Iterable[tuple[Sequence[Item], np.ndarray, dict[int, str]]],
            top_k: int = 3) -> Iterator[list[Prediction]]:
    """Predict every decoded batch with one `session.run`, yielding its predictions in input order.

    Args:
        model: The loaded model.
        decoded: From `decode_batches`.
        top_k: How many (label, probability) pairs each prediction's ``top_k`` holds.
    """
    for chunk, pixels, errors in decoded:
        # pixels[:, None]: [M, 28, 28] -> [M, 1, 28, 28], the model's NCHW input
        ranked = rank(softmax(model.logits(pixels[:, None])), model.labels, top_k) if len(pixels) else []
        good = iter(ranked)
        out = []
        for i, item in enumerate(chunk):
            if i in errors:
                out.append(Prediction(item.name, error=errors[i]))
            else:
                top = next(good)
                out.append(Prediction(item.name, top[0][0], top[0][1], top))
        yield out


def _emit(out: list[str], err: list[str], stdout: TextIO, stderr: TextIO) -> None:
    """Write one batch's lines: results to ``stdout``, flushed so that they precede its errors on ``stderr``.

    Raises:
        BrokenPipeError: the reader of ``stdout`` went away.
        BnpipeError: ``stdout`` cannot be written (a full disk, /dev/full).
    """
    try:
        if out:
            stdout.write("\n".join(out) + "\n")
        stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise output_error(stdout, exc) from None
    if err:
        stderr.write("\n".join(err) + "\n")


def run(paths: Sequence[str], model_path: str, device: str = "auto", batch_size: int = 256, as_json: bool = False,
        top_k: int = 3, workers: int | None = None, verbose: bool = False, stdin: BinaryIO | None = None,
        stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Label every input and write one line for each, in input order: all of `bnpipe predict`.

    Args:
        paths: Image files, directories (taken recursively), or ``-`` for one image on stdin.
        model_path: The ONNX model written by `bnpipe export`.
        device: ``auto``, ``cuda`` or ``cpu``.
        batch_size: Images per onnxruntime run.
        as_json: Write JSON Lines (failures included) instead of tab-separated text.
        top_k: How many labels each JSON line's ``top_k`` lists.
        workers: Decode processes; None picks `default_workers`.
        verbose: Say on ``stderr`` which execution provider runs.
        stdin, stdout, stderr: The streams; None takes the process's (sys.stdin.buffer...).

    Returns:
        The exit status: 0 when every input was labelled, 1 when any failed or the reader of
        ``stdout`` went away (then the rest is dropped quietly, as `| head` expects).

    Raises:
        BnpipeError: the model is unusable, the device cannot be had, or ``stdout`` cannot be written.
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    data = (sys.stdin.buffer if stdin is None else stdin).read() if STDIN in paths else None
    items = expand_inputs(paths, data)
    failed = 0
    try:
        with decoding_pool(len(items), workers) as pool:
            decoded = decode_batches(items, batch_size, pool)  # workers start now, while the model loads
            # Every core for inference: the workers, faster than the model loads, are mostly done by now.
            model = Model.load(model_path, device, verbose)
            if verbose:
                stderr.write(f"bnpipe: {model_path} runs on {model.provider}\n")
            # The text form shows only the top label: ranking more would be wasted work.
            for batch in predict(model, decoded, top_k if as_json else 1):
                failed += sum(p.error is not None for p in batch)
                out, err = ([json_line(p) for p in batch], []) if as_json else text_lines(batch)
                _emit(out, err, stdout, stderr)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        discard_stream(stdout)
        return 1
    return 1 if failed else 0
