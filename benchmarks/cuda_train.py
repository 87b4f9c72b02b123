"""CUDA seconds per epoch of `bnpipe train`: eager steps against the replayed CUDA graph, in one process.

Each way is the whole default recipe (5 epochs), through `bnpipe.train.loop.train` as the CLI runs it;
the ways alternate over ``--rounds``, so that both see the same GPU and host. An epoch's seconds are
the sidecar's: training plus the test evaluation. Also checked: the graphed run ends with the eager
run's weights, bit for bit, and (``--ways compile``) what ``torch.compile(mode="reduce-overhead")`` of the
net gives instead, its first epoch including the compilation.

    python benchmarks/cuda_train.py --data ../shared/data [--rounds 2] [--ways eager,graph,compile]

Goal (issue 9): at most 0.5 s per epoch on an H100, at least 99.0% after 5 epochs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
from pathlib import Path

import torch

from bnpipe.train import loop
from bnpipe.train.config import TrainConfig


def run(data: str, workdir: Path, way: str) -> tuple[list[float], float, dict[str, torch.Tensor]]:
    """Train the default recipe one way; return epoch seconds, final test accuracy and the weights."""
    epoch_fn, build = loop.train_one_epoch, loop.build_model
    try:
        if way != "graph":
            loop.train_one_epoch = functools.partial(epoch_fn, cuda_graph=False)  # type: ignore[assignment]
        if way == "compile":
            loop.build_model = lambda arch: torch.compile(build(arch), mode="reduce-overhead")  # type: ignore[assignment]
        config = TrainConfig(data=data, device="cuda", out=str(workdir / f"{way}.pt"))
        metrics = loop.train(config, log=lambda line: print(f"  {way}: {line}", flush=True))
    finally:
        loop.train_one_epoch, loop.build_model = epoch_fn, build  # type: ignore[assignment]
    state = torch.load(config.out, weights_only=True)["state_dict"]
    return [m["seconds"] for m in metrics], metrics[-1]["test_acc"], state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="MNIST root (default: $BNPIPE_DATA, else ./data)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ways", default="eager,graph", help="of eager, graph, compile (reduce-overhead)")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    seconds: dict[str, list[float]] = {way: [] for way in args.ways.split(",")}
    states = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for way in seconds:
                try:
                    times, acc, states[way] = run(args.data, Path(tmp), way)
                except Exception as exc:  # torch.compile's failures are a finding, not a crash
                    print(f"{way}: failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
                    continue
                seconds[way] += times[1:]  # epoch 1 also pays cuDNN's and the allocator's first calls (and compiling)
                print(f"{way}: epochs {' '.join(f'{t:.3f}' for t in times)} s, test accuracy {acc:.4f}", flush=True)
    medians = {way: statistics.median(t) for way, t in seconds.items() if t}
    print("median epoch (epochs 2-5): " + ", ".join(f"{way} {m:.3f} s" for way, m in medians.items()))
    if "eager" in medians and "graph" in medians:
        same = all(torch.equal(states["eager"][k], states["graph"][k]) for k in states["eager"])
        print(f"graph / eager: {medians['graph'] / medians['eager']:.2f}; graph weights identical to eager: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
