"""Seconds per training epoch (train + test eval) of bnpipe's ways to train, against a tutorial-style baseline.

The baseline is what the tutorial did: its net in stock ``torch.nn`` layers, in its order (Conv, BN,
ReLU, MaxPool), torchvision MNIST with a per-sample numpy transform, a DataLoader with batch 64, a
sync per batch for the metrics, in this process with torch's default threads. It uses bnpipe's
optimizer settings (SGD with momentum and weight decay, no schedule), so that the ratio measures
the pipeline and the layers, not the recipe. The bnpipe ways run as `bnpipe train` processes, and their epoch seconds are read from
the JSON sidecar (training and test evaluation of each epoch, not process start-up):

- 1 process x 2 threads: `bnpipe train` as it always ran;
- 2 processes x 1 thread, DDP: `bnpipe train --nproc-per-node 2`;
- 2 processes x 1 thread, DDP, `--bn sync`.

Every run of a way is bracketed by two baseline epochs and divided by their mean, so the ratios
hold up on a machine whose load drifts; rounds rotate the order of the ways, and a way's ratio is
the median over rounds.

    python benchmarks/train_speed.py --data ../shared/data [--repeats 1] [--epochs 5] [--breakdown]

Targets: the fastest way at most 0.5x the baseline's seconds per epoch, and (with --epochs 5 and
no --limit-train) at least 99.0% test accuracy after 5 epochs, for that way and for --bn sync.
--breakdown first times where a single-process step goes (forward, backward, optimizer, input,
threads, the fixed cost of a step (one of 2 images), the step with its backward written out
(`bnpipe.train.step`, as `bnpipe train` runs it) against autograd's, the fused first conv + BN
against the stock modules, channels_last, the second conv's weight gradient three ways, evaluation,
and glibc's allocator settings).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import MNIST

from bnpipe.datadir import resolve_data_root
from bnpipe.train import step as train_step
from bnpipe.train.config import TrainConfig
from bnpipe.train.data import load_mnist
from bnpipe.train.loop import evaluate
from bnpipe.train.model import build_model, default_arch
from bnpipe.train.preprocess import Normalization
from bnpipe.train.sgd import sgd_step

TARGET, ACCURACY = 0.5, 0.99
WAYS = {
    "1 process x 2 threads": ([], {"OMP_NUM_THREADS": "2"}),
    "2 processes x 1 thread, DDP": (["--nproc-per-node", "2"], {}),
    "2 processes x 1 thread, DDP, --bn sync": (["--nproc-per-node", "2", "--bn", "sync"], {}),
}


def tutorial_net() -> nn.Module:
    """The tutorial's net as it wrote it: stock layers, ReLU before each pool (convs without bias, as bnpipe's)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 10),
    )


def tutorial_epoch(root: Path, cfg: TrainConfig, limit: int | None) -> float:
    """Seconds for one tutorial-style epoch: per-sample transform, DataLoader, per-batch .item()."""

    def transform(img: object) -> torch.Tensor:
        return torch.from_numpy(((np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5)[None])

    model = tutorial_net()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    train_set = MNIST(str(root), train=True, transform=transform)
    if limit is not None:
        train_set = Subset(train_set, range(limit))
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    test_loader = DataLoader(MNIST(str(root), train=False, transform=transform), batch_size=64)
    model.train()
    total_loss = correct = 0.0
    for x, y in train_loader:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total_loss += loss.item()
        correct += (logits.argmax(1) == y).sum().item()
    model.eval()
    with torch.no_grad():
        for x, y in test_loader:
            logits = model(x)
            total_loss += F.cross_entropy(logits, y).item()
            correct += (logits.argmax(1) == y).sum().item()
    return time.perf_counter() - t0


def bnpipe_run(root: Path, way: str, epochs: int, limit: int | None, workdir: Path) -> list[dict[str, float]]:
    """Run `bnpipe train` the given way; return its per-epoch metrics from the sidecar."""
    args, env = WAYS[way]
    out = workdir / "m.pt"
    cmd = [sys.executable, "-m", "bnpipe", "train", "--data", str(root), "--epochs", str(epochs), "--device", "cpu",
           "--out", str(out), *args, *(["--limit-train", str(limit)] if limit else [])]
    base_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run(cmd, env={**base_env, **env}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
    return json.loads(out.with_suffix(".json").read_text())["metrics"]


def _ms_per_step(fn: object, steps: int = 150) -> float:
    for _ in range(10):
        fn()  # type: ignore[operator]
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - t0) / steps * 1e3


# Run in a child process: glibc's settings last for the process, and this one times the baseline after.
ALLOCATOR = """
import resource, time, torch, torch.nn.functional as F
from bnpipe.train.allocator import keep_freed_memory
from bnpipe.train.model import build_model, default_arch
torch.manual_seed(0)
model = build_model(default_arch())
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
def steps(n):
    for _ in range(n):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
for label in ("glibc's defaults", "keep_freed_memory()"):
    if label != "glibc's defaults":
        keep_freed_memory()
    steps(20)
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    steps(300)
    ms, faults = (time.perf_counter() - t0) / 300 * 1e3, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 300
    print(f"  allocator, {label}: {ms:.2f} ms and {faults:.0f} page faults per step of 64 (2 threads, one batch)")
"""


def wgrad_ways(batch: int) -> None:
    """The second conv's weight gradient alone, three ways (`bnpipe.train.step` takes the channels_last one)."""
    cl, conv = torch.channels_last, nn.Conv2d(6, 16, 5, bias=False)
    h1, g = torch.randn(batch, 6, 14, 14), torch.randn(batch, 16, 10, 10)
    ways = {"NCHW": lambda: train_step.conv_backward(g, h1, conv, weight=True).contiguous(),
            "forward conv of the transposed batch": lambda: F.conv2d(h1.transpose(0, 1), g.transpose(0, 1))
            .transpose(0, 1).contiguous(),
            "channels_last copies (copies included)": lambda: train_step.conv_backward(
                g.contiguous(memory_format=cl), h1.contiguous(memory_format=cl), conv, weight=True).contiguous()}
    times = {name: [_ms_per_step(fn, 200) for _ in range(5)] for name, fn in ways.items()}
    print("  second conv weight gradient alone, ms: "
          + ", ".join(f"{name} {statistics.median(t):.3f}" for name, t in times.items()), flush=True)


def breakdown(root: Path, cfg: TrainConfig) -> None:
    """Where one single-process step of batch 64 goes, and what the evaluation pass costs."""
    x_all, y_all = load_mnist(root, train=True)
    norm = Normalization.from_mode("half", x_all)
    idx = torch.randperm(x_all.shape[0])[: cfg.batch_size]
    x, y = norm.apply(x_all[idx]), y_all[idx]
    inputs = norm.apply(x_all)  # as `bnpipe train` does, once
    for threads in (2, 1):
        torch.set_num_threads(threads)
        row = {}
        for name, kw, layout in (("step, autograd", {"fused": True}, torch.contiguous_format), ("step, SGD not fused", {}, None),
                                 ("step, stock conv + BN", {"fused": True}, None),
                                 ("step, channels_last", {"fused": True}, torch.channels_last),
                                 ("step, tutorial's net", {"fused": True}, None)):
            net = tutorial_net() if "tutorial" in name else build_model(default_arch())
            if "stock" in name:  # any hook on the BN keeps the first conv and BN as two modules (bnpipe.train.conv_bn)
                net.features[1].register_forward_hook(lambda module, inputs, output: None)
            model = net.to(memory_format=layout or torch.contiguous_format)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, **kw)
            xb = x.contiguous(memory_format=layout or torch.contiguous_format)

            def step(images: torch.Tensor = xb, labels: torch.Tensor = y) -> None:
                loss = F.cross_entropy(model(images), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sgd_step(opt)  # as train_step takes it (optimizer.step() where SGD is not fused)

            row[name] = _ms_per_step(step)
            if name == "step, autograd":
                # The cost a step has whatever its batch: Python, dispatch, autograd, oneDNN set-up.
                row["step of 2 images (the fixed cost)"] = _ms_per_step(lambda: step(xb[:2], y[:2]))

                def written_out(images: torch.Tensor = xb, labels: torch.Tensor = y) -> None:
                    train_step.forward_backward(model, images, labels, 1 / images.shape[0])
                    sgd_step(opt)  # as train_step takes it

                assert train_step.applies(model, xb)
                row["step as bnpipe trains (backward written out)"] = _ms_per_step(written_out)
                row["the same, of 2 images"] = _ms_per_step(lambda: written_out(xb[:2], y[:2]))
                row["forward"] = _ms_per_step(lambda: F.cross_entropy(model(xb), y))
                row["forward + backward"] = _ms_per_step(lambda: F.cross_entropy(model(xb), y).backward())
                row["input (gather)"] = _ms_per_step(lambda: inputs.index_select(0, idx))
                row["input (gather + normalize per step)"] = _ms_per_step(lambda: norm.apply(x_all[idx]))
        print(f"  {threads} thread(s), ms per step of {cfg.batch_size}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    torch.set_num_threads(2)
    wgrad_ways(cfg.batch_size)
    test_x, test_y = load_mnist(root, train=False)
    model = build_model(default_arch())
    t0 = time.perf_counter()
    evaluate(model, test_x, test_y, norm)
    print(f"  evaluation of the 10,000 test images (2 threads): {time.perf_counter() - t0:.2f}s", flush=True)
    subprocess.run([sys.executable, "-c", ALLOCATOR], check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})


def main() -> int:
    """Time the baseline and every way, print the ratios; return 0 when the targets are met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="MNIST root (default: $BNPIPE_DATA, else ./data)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of baseline + every way")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each bnpipe run (5: also check accuracy)")
    parser.add_argument("--limit-train", type=int, default=None, help="train on the first N images (quick runs)")
    parser.add_argument("--ways", default=",".join(str(i) for i in range(len(WAYS))), help="which ways, e.g. 0,1")
    parser.add_argument("--breakdown", action="store_true", help="first time the parts of one step")
    args = parser.parse_args()
    root, cfg = resolve_data_root(args.data), TrainConfig()
    ways = [list(WAYS)[int(i)] for i in args.ways.split(",")]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} threads here, "
          f"batch {cfg.batch_size}, {args.epochs} epoch(s) per run, {args.limit_train or 60000} training images")
    if args.breakdown:
        breakdown(root, cfg)
    # Each run of a way is bracketed by baseline epochs, and compared with their mean: the load of a
    # shared machine drifts over minutes, so a baseline measured long before would mislead.
    base = [tutorial_epoch(root, cfg, args.limit_train)]
    print(f"  tutorial-style {base[-1]:.2f}s", flush=True)
    ratio_runs: dict[str, list[float]] = {w: [] for w in ways}
    epochs: dict[str, list[float]] = {w: [] for w in ways}
    accuracy: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for way in ways[r % len(ways):] + ways[: r % len(ways)]:
                metrics = bnpipe_run(root, way, args.epochs, args.limit_train, Path(tmp))
                base.append(tutorial_epoch(root, cfg, args.limit_train))
                seconds = statistics.median(m["seconds"] for m in metrics)
                epochs[way].append(seconds)
                ratio_runs[way].append(seconds / statistics.mean(base[-2:]))
                accuracy[way] = metrics[-1]["test_acc"]
                print(f"  {way}: epochs {', '.join(format(m['seconds'], '.2f') for m in metrics)}s, test accuracy "
                      f"{accuracy[way]:.4f}; tutorial-style {base[-1]:.2f}s; ratio {ratio_runs[way][-1]:.2f}x", flush=True)
    print(f"tutorial-style: {statistics.median(base):.2f}s per epoch (train + test eval), median of {len(base)}")
    ratios = {}
    for way in ways:
        ratios[way] = statistics.median(ratio_runs[way])
        print(f"{way}: {statistics.median(epochs[way]):.2f}s per epoch, {ratios[way]:.2f}x the baseline beside it, "
              f"final test accuracy {accuracy[way]:.4f} after {args.epochs} epoch(s)")
    best = min(ratios, key=ratios.__getitem__)
    ok = ratios[best] <= TARGET
    if args.epochs == 5 and args.limit_train is None:
        ok = ok and accuracy[best] >= ACCURACY and all(accuracy[w] >= ACCURACY for w in ways if "sync" in w)
    one, two = ways[0] if "1 process" in ways[0] else None, next((w for w in ways if "2 processes" in w), None)
    if one and two:
        print(f"2 processes / 1 process: {ratios[two] / ratios[one]:.2f}x the time per epoch")
    print(f"fastest: {best}, {ratios[best]:.2f}x (target <= {TARGET}x): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
