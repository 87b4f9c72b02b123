"""One epoch of bnpipe training (train + test evaluation) against a tutorial-style baseline.

The baseline is what the tutorial did: torchvision MNIST with a per-sample numpy transform, a
DataLoader with batch 64, a sync per batch for the metrics. Both train the same net with the same
optimizer, in the same process, alternating, so the ratio holds up on a noisy machine.

    python benchmarks/train_speed.py --data ../shared/data [--repeats 2]

Target: bnpipe's seconds per epoch at most 0.75x the baseline's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.datasets import MNIST

from bnpipe.train.config import TrainConfig
from bnpipe.datadir import resolve_data_root
from bnpipe.train.data import load_mnist
from bnpipe.train.loop import evaluate, make_scheduler, train_one_epoch
from bnpipe.train.model import build_model, default_arch
from bnpipe.train.preprocess import Normalization

TARGET = 0.75


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def tutorial_epoch(root: Path, cfg: TrainConfig) -> float:
    """Seconds for one tutorial-style epoch: per-sample transform, DataLoader, per-batch .item()."""

    def transform(img: object) -> torch.Tensor:
        return torch.from_numpy(((np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5)[None])

    model = build_model(default_arch())
    opt = _optimizer(model, cfg)
    t0 = time.perf_counter()
    train_loader = DataLoader(MNIST(str(root), train=True, transform=transform), batch_size=64, shuffle=True)
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


def bnpipe_epoch(root: Path, cfg: TrainConfig) -> float:
    """Seconds for one bnpipe epoch: whole-tensor data, batch normalization, evaluation."""
    model = build_model(default_arch())
    opt = _optimizer(model, cfg)
    t0 = time.perf_counter()
    train_x, train_y = load_mnist(root, train=True)
    test_x, test_y = load_mnist(root, train=False)
    norm = Normalization.from_mode(cfg.normalize, train_x)
    steps = -(-train_x.shape[0] // cfg.batch_size)
    sched = make_scheduler(opt, cfg.schedule, steps)
    train_one_epoch(model, train_x, train_y, norm, opt, sched, cfg.batch_size, torch.Generator().manual_seed(0))
    evaluate(model, test_x, test_y, norm)
    return time.perf_counter() - t0


def main() -> int:
    """Time both epochs, print the ratio; return 0 when it meets the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="MNIST root (default: $BNPIPE_DATA, else ./data)")
    parser.add_argument("--repeats", type=int, default=1, help="epochs of each, alternating")
    args = parser.parse_args()
    root, cfg = resolve_data_root(args.data), TrainConfig()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {cfg.batch_size}, SGD momentum {cfg.momentum}")
    base, ours = [], []
    for _ in range(args.repeats):
        base.append(tutorial_epoch(root, cfg))
        ours.append(bnpipe_epoch(root, cfg))
        print(f"  tutorial-style {base[-1]:.2f}s   bnpipe {ours[-1]:.2f}s", flush=True)
    b, o = statistics.median(base), statistics.median(ours)
    ratio = o / b
    print(f"seconds per epoch (train + test eval): tutorial-style {b:.2f}s, bnpipe {o:.2f}s, "
          f"ratio {ratio:.2f}x (target <= {TARGET}x): {'PASS' if ratio <= TARGET else 'FAIL'}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
