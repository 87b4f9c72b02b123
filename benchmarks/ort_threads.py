"""One intra-op thread against several, per batch size: the measurement behind `runtime.PARALLEL_ROWS`.

For each batch size, two CPU sessions of the same model (1 thread, and `intra_op_threads()`,
both without spinning, as `Model.load` makes them) run in alternating blocks; the script prints
the median wall and CPU time of a run for each, and the ratio of the one-thread session to the
other. Below `PARALLEL_ROWS` one thread should be at least as fast; at and above it, the
others should pay for themselves.

Usage: python benchmarks/ort_threads.py [--model models/bn_convnet.onnx] [--blocks 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bnpipe.serve.runtime import PARALLEL_ROWS, Model, intra_op_threads

SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def block(model: Model, session: object, pixels: np.ndarray, runs: int) -> tuple[float, float]:
    """Seconds of wall and of process CPU per run, over ``runs`` runs."""
    feed = {model.session.get_inputs()[0].name: pixels}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(runs):
        session.run(None, feed)  # type: ignore[attr-defined]
    return (time.perf_counter() - wall0) / runs, (time.process_time() - cpu0) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/bn_convnet.onnx")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per session and size")
    args = parser.parse_args()
    threads = intra_op_threads()
    if threads < 2:
        raise SystemExit("one usable CPU: there is nothing to compare")
    model = Model.load(args.model, "cpu", threads=threads)
    sessions = {1: model.small, threads: model.session}
    print(f"{threads} threads against 1; PARALLEL_ROWS = {PARALLEL_ROWS}")
    print(f"{'rows':>5} {'1 thread µs':>12} {f'{threads} threads µs':>14} {'CPU 1 / n µs':>14} {'wall ratio 1/n':>15}")
    for rows in SIZES:
        pixels = np.random.default_rng(rows).integers(0, 256, (rows, 1, 28, 28), dtype=np.uint8)
        runs = max(20, 2000 // rows)
        times: dict[int, list[tuple[float, float]]] = {n: [] for n in sessions}
        for _ in range(args.blocks):
            for n, session in sessions.items():
                block(model, session, pixels, 5)  # warm this shape
                times[n].append(block(model, session, pixels, runs))
        wall = {n: statistics.median(w for w, _ in t) * 1e6 for n, t in times.items()}
        cpu = {n: statistics.median(c for _, c in t) * 1e6 for n, t in times.items()}
        print(f"{rows:>5} {wall[1]:>12.0f} {wall[threads]:>14.0f} {cpu[1]:>6.0f} / {cpu[threads]:<6.0f} "
              f"{wall[1] / wall[threads]:>15.2f}")


if __name__ == "__main__":
    main()
