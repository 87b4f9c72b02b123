"""What a checkpoint carries to resume a run, and the checks before resuming from one.

Every epoch's checkpoint holds, under ``resume``, the epoch, the optimizer's and the scheduler's
state, the global torch RNG state and the torchrun run id. The data order of an epoch depends on
(seed, epoch) alone (:func:`bnpipe.train.distributed.epoch_order`), so a resumed run continues
with exactly the batches the uninterrupted one would have seen: on the CPU, bit-identical weights.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from bnpipe.errors import BnpipeError
from bnpipe.train.checkpoint import load_checkpoint
from bnpipe.train.config import TrainConfig
from bnpipe.train.distributed import restart_count

# Settings a resumed run may change: where the data is, where it runs and waits, where it writes.
FREE_FIELDS = ("data", "device", "dist_timeout", "out")


def resume_state(epoch: int, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """The ``resume`` field of the checkpoint written after ``epoch``: plain dicts, lists and tensors."""
    return {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_state": torch.get_rng_state(),
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
    }


def config_from_checkpoint(ckpt: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """The run's own config, with only the free fields (data, device, out) replaced.

    Raises:
        BnpipeError: ``overrides`` changes the recipe (the resumed run would be another run).
    """
    known = {f.name for f in fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    for name, value in overrides.items():
        if name not in FREE_FIELDS and value != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise BnpipeError(f"{flag} {value}: --resume continues the run with its own settings "
                              f"({name} = {getattr(saved, name)}); drop the option")
    return TrainConfig(**{**asdict(saved), **{k: v for k, v in overrides.items() if k in FREE_FIELDS}})


def load_resume(path: str | os.PathLike[str], config: TrainConfig) -> dict[str, Any]:
    """Load and check a checkpoint to resume ``config`` from.

    Returns:
        The checkpoint, its ``resume`` field checked.

    Raises:
        BnpipeError: Not a checkpoint, no resume state, another recipe, or a finished run.
    """
    ckpt = load_checkpoint(path)
    state = ckpt.get("resume")
    if not isinstance(state, dict) or not all(k in state for k in ("epoch", "optimizer", "scheduler", "rng_state")):
        raise BnpipeError(f"checkpoint {path}: holds no resume state (written by an older bnpipe)")
    config_from_checkpoint(ckpt, {k: v for k, v in asdict(config).items() if k not in FREE_FIELDS})
    epoch = state["epoch"]
    if not isinstance(epoch, int) or not 1 <= epoch <= config.epochs:
        raise BnpipeError(f"checkpoint {path}: resume epoch {epoch!r} is not within 1..{config.epochs}")
    if epoch == config.epochs:
        raise BnpipeError(f"checkpoint {path}: the run finished all {epoch} epochs; nothing to resume")
    return ckpt


def restart_checkpoint(config: TrainConfig) -> Path | None:
    """After a torchrun restart, the checkpoint this same run wrote before the failure, if any.

    torchrun restarts the workers with the same command line; they pick up from ``--out`` when it
    holds this run's state (same torchrun run id) and is not yet finished.
    """
    out = Path(config.out)
    if restart_count() < 1 or not out.is_file():
        return None
    state = load_checkpoint(out).get("resume")
    if not isinstance(state, dict) or state.get("run_id") != os.environ.get("TORCHELASTIC_RUN_ID", ""):
        return None
    if state.get("epoch") == config.epochs:
        return None
    return out


KILL_ENV = "BNPIPE_TEST_KILL_AT"


def kill_hook(rank: int, steps_before: int) -> Callable[[int], None] | None:
    """TEST ONLY: ``BNPIPE_TEST_KILL_AT=RANK:STEP`` makes that rank SIGKILL itself after global step STEP.

    Fires on torchrun's first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0), so the restarted
    workers run through; the fault-tolerance test uses it to die at a known point mid-epoch.

    Args:
        rank: This process's rank.
        steps_before: Global steps done before the epoch this hook is for; steps count from 1.
    """
    spec = os.environ.get(KILL_ENV)
    if not spec or restart_count() > 0:
        return None
    kill_rank, kill_step = (int(v) for v in spec.split(":"))
    if kill_rank != rank:
        return None

    def hook(i: int) -> None:
        if steps_before + i + 1 == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
