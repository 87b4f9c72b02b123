"""Batch prediction: expand the inputs, decode them in parallel, one `session.run` per batch.

Every input yields exactly one `Prediction`, in input order: a label and its probability, or
the reason it could not be read. A bad image never stops the others.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnpipe.serve.image import ImageError, load_digit
from bnpipe.serve.runtime import Model

STDIN = "-"
PARALLEL_MIN = 512  # below this many images a worker pool costs more than it saves


@dataclass
class Item:
    """One input: ``name`` as the user will see it, ``source`` a path or the bytes read from stdin."""

    name: str
    source: str | bytes
    error: str | None = None  # set when the input is known bad before decoding (a missing path)


@dataclass
class Prediction:
    """The result for one input: ``label``/``probability``/``top_k``, or ``error``."""

    path: str
    label: str | None = None
    probability: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def walk_images(directory: str) -> list[str]:
    """Return the files under ``directory``, recursively, sorted by path components.

    Every file counts except hidden ones (``.DS_Store``, editor swap files): one that is not an
    image is reported as such rather than silently skipped.
    """
    found: list[str] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, f) for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.split(os.sep))


def expand_inputs(paths: Sequence[str], stdin: bytes | None = None) -> list[Item]:
    """Turn the command line's PATHs into items: files, directory contents, stdin.

    Args:
        paths: Each an image file, a directory, or ``-``.
        stdin: The bytes of standard input, when ``-`` is among ``paths``.

    Returns:
        One item per image, in order; a missing path or an empty directory is an item with
        ``error`` set, so that it is reported in its place.
    """
    items: list[Item] = []
    for path in paths:
        if path == STDIN:
            items.append(Item(STDIN, stdin if stdin is not None else b""))
        elif os.path.isdir(path):
            files = walk_images(path)
            items.extend(Item(f, f) for f in files)
            if not files:
                items.append(Item(path, path, error="directory holds no files"))
        elif not os.path.exists(path):
            items.append(Item(path, path, error="no such file or directory"))
        else:
            items.append(Item(path, path))
    return items


def decode_batch(items: Sequence[Item]) -> tuple[np.ndarray, dict[int, str]]:
    """Decode a batch of inputs into model input.

    Returns:
        pixels [M, 28, 28] uint8 for the M good items in order, and {index in ``items``:
        reason} for the others.
    """
    digits: list[np.ndarray] = []
    errors: dict[int, str] = {}
    for i, item in enumerate(items):
        if item.error is not None:
            errors[i] = item.error
            continue
        try:
            digits.append(load_digit(item.source, item.name))
        except ImageError as exc:
            errors[i] = exc.reason
    return (np.stack(digits) if digits else np.empty((0, 28, 28), np.uint8)), errors


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
    """Decode processes for ``n_items`` images: one per usable CPU, none for small jobs."""
    if n_items < PARALLEL_MIN:
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
