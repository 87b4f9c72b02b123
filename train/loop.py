"""The training loop: whole-tensor MNIST, batch normalization on the fly, one sync per epoch."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bnpipe.atomic import check_writable, write_text_atomic
from bnpipe.errors import BnpipeError
from bnpipe.train.checkpoint import save_checkpoint
from bnpipe.train.config import SCHEDULES, TrainConfig
from bnpipe.datadir import resolve_data_root
from bnpipe.train.data import CLASSES, load_mnist
from bnpipe.train.model import build_model, default_arch
from bnpipe.train.preprocess import Normalization

NAN_CHECK_EVERY = 100  # batches between loss checks: each check is a device sync


def resolve_device(name: str) -> torch.device:
    """Map ``auto|cpu|cuda`` to a device; asking for CUDA without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BnpipeError("--device cuda: no CUDA GPU is available to torch on this machine")
    if name not in ("cpu", "cuda"):
        raise BnpipeError(f"--device {name}: expected auto, cpu or cuda")
    return torch.device(name)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step learning-rate schedule over ``total_steps``.

    ``none`` keeps the rate constant; ``cosine`` decays it to zero; ``onecycle`` warms up for the
    first 20% of steps to the peak rate, then anneals (Smith's one-cycle policy), keeping the
    optimizer's own momentum.
    """
    total_steps = max(total_steps, 1)
    if schedule == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if schedule == "onecycle":
        peak = optimizer.param_groups[0]["lr"]
        if total_steps < 3:  # too short to warm up and anneal; OneCycleLR would divide by zero
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        # The warm-up must span at least 2 steps, or OneCycleLR divides by zero on tiny runs.
        warmup = max(0.2, 2.0 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total_steps, pct_start=warmup,
                                                   cycle_momentum=False)
    raise BnpipeError(f"--schedule {schedule}: expected one of {', '.join(SCHEDULES)}")


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    norm: Normalization,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    generator: torch.Generator,
    progress: bool = False,
) -> tuple[float, float]:
    """One pass over shuffled ``images`` (uint8 [N,1,28,28] on the model's device).

    Loss and correct counts stay on the device and are read once at the end (and every
    ``NAN_CHECK_EVERY`` batches to stop early on a non-finite loss).

    Returns:
        Mean training loss and accuracy over the epoch.

    Raises:
        FloatingPointError: The loss became NaN or infinite.
    """
    model.train()
    n = images.shape[0]
    order = torch.randperm(n, generator=generator).to(images.device)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    batches = range(0, n, batch_size)
    for i, start in enumerate(tqdm(batches, desc="train", leave=False, disable=not progress)):
        idx = order[start : start + batch_size]
        x, y = norm.apply(images[idx]), labels[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        if (i + 1) % NAN_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
            break
    if not torch.isfinite(loss_sum):
        raise FloatingPointError("training loss is not finite")
    return loss_sum.item() / n, correct.item() / n


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, norm: Normalization,
             batch_size: int = 256) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode, without gradients.

    Batches of 256 keep the activations in cache: 2.3x faster on CPU here than batches of 2000.
    """
    model.eval()
    loss_sum = torch.zeros((), device=images.device, dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, images.shape[0], batch_size):
        logits = model(norm.apply(images[start : start + batch_size]))
        y = labels[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    n = images.shape[0]
    return loss_sum.item() / n, correct.item() / n


def sidecar_paths(out: str | Path) -> tuple[Path, Path]:
    """The JSON sidecar and PNG plot that go beside checkpoint ``out``."""
    out = Path(out)
    return out.with_suffix(".json"), out.with_suffix(".png")


def train(config: TrainConfig, log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Train the net per ``config``; write checkpoint, JSON sidecar and plot after every epoch.

    Each write is atomic, so a failure (a non-finite loss, an interrupt) leaves the last good
    checkpoint in place.

    Returns:
        The per-epoch metrics: epoch, train_loss, train_acc, test_loss, test_acc, seconds, lr.

    Raises:
        BnpipeError: Bad config, missing or corrupt data, or a non-finite loss.
    """
    import json

    from bnpipe.train.plot import plot_curves

    if config.epochs < 1 or config.batch_size < 1 or (config.limit_train is not None and config.limit_train < 1):
        raise BnpipeError("--epochs, --batch-size and --limit-train must be positive")
    if Path(config.out).suffix in (".json", ".png"):
        raise BnpipeError(f"--out {config.out}: the .json sidecar and .png plot go beside the checkpoint; "
                          "give it another suffix, such as .pt")
    check_writable(config.out)  # before minutes of training, not after
    device = resolve_device(config.device)
    if device.type == "cuda":
        # Same seed, same weights on a GPU too: cuDNN's fastest conv backward kernels add in a
        # varying order, and cuBLAS needs a fixed workspace to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(config.seed)
    root = resolve_data_root(config.data)
    train_x, train_y = load_mnist(root, train=True)
    test_x, test_y = load_mnist(root, train=False)
    if config.limit_train is not None:
        train_x, train_y = train_x[: config.limit_train], train_y[: config.limit_train]
    norm = Normalization.from_mode(config.normalize, train_x)
    train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))

    arch = default_arch(config.bn)
    model = build_model(arch).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(train_x.shape[0] / config.batch_size)
    scheduler = make_scheduler(optimizer, config.schedule, config.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    progress = sys.stderr.isatty()
    json_path, png_path = sidecar_paths(config.out)
    metrics: list[dict[str, float]] = []
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        try:
            train_loss, train_acc = train_one_epoch(model, train_x, train_y, norm, optimizer, scheduler,
                                                    config.batch_size, generator, progress)
        except FloatingPointError:
            kept = f"; the last good checkpoint is still {config.out}" if metrics else "; no checkpoint was written"
            raise BnpipeError(f"training loss became non-finite in epoch {epoch} (try a lower --lr){kept}") from None
        test_loss, test_acc = evaluate(model, test_x, test_y, norm)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
               "test_acc": test_acc, "seconds": time.perf_counter() - t0, "lr": optimizer.param_groups[0]["lr"]}
        metrics.append(row)
        log(f"epoch {epoch}/{config.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
            f"test loss {test_loss:.4f} acc {test_acc:.4f}  {row['seconds']:.1f}s")
        save_checkpoint(config.out, model, arch, norm, list(CLASSES), asdict(config), metrics)
        write_text_atomic(json_path, json.dumps({"config": asdict(config), "arch": arch,
                                                 "preprocessing": norm.to_dict(), "metrics": metrics}, indent=2) + "\n")
        plot_curves(metrics, png_path)
    return metrics
