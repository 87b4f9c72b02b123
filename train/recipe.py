"""The device and the learning-rate schedule of a run."""

from __future__ import annotations

import os

import torch

from bnpipe.errors import BnpipeError
from bnpipe.train.config import SCHEDULES


def resolve_device(name: str) -> torch.device:
    """Map ``auto|cpu|cuda`` to a device; asking for CUDA without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BnpipeError("--device cuda: no CUDA GPU is available to torch on this machine")
    if name not in ("cpu", "cuda"):
        raise BnpipeError(f"--device {name}: expected auto, cpu or cuda")
    return torch.device(name)


def make_deterministic(device: torch.device) -> None:
    """Same seed, same weights on a GPU too: cuDNN's fastest conv backward kernels add in a varying
    order, and cuBLAS needs a fixed workspace to be deterministic. (The CPU kernels already are.)"""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


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
