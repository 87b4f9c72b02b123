"""The files a run writes after every epoch: checkpoint (with resume state), JSON sidecar, PNG curves."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnpipe import __version__
from bnpipe.atomic import write_text_atomic
from bnpipe.train.checkpoint import save_checkpoint
from bnpipe.train.config import TrainConfig
from bnpipe.train.data import CLASSES
from bnpipe.train.preprocess import Normalization


def sidecar_paths(out: str | Path) -> tuple[Path, Path]:
    """The JSON sidecar and PNG plot that go beside checkpoint ``out``."""
    out = Path(out)
    return out.with_suffix(".json"), out.with_suffix(".png")


def run_facts(device: torch.device, processes: int) -> dict[str, Any]:
    """Where a run trains: the device it resolved to, its process count, and the torch it ran on."""
    # str(): torch.__version__ is a str subclass, which a weights_only load refuses.
    return {"device": str(device), "processes": processes, "torch_version": str(torch.__version__)}


def write_artifacts(config: TrainConfig, net: nn.Module, arch: dict[str, Any], norm: Normalization,
                    metrics: list[dict[str, float]], state: dict[str, Any], run: dict[str, Any]) -> None:
    """Checkpoint (with its ``resume`` state), JSON sidecar and PNG curves, each written atomically.

    ``run`` says where it ran (`run_facts`), which the config's ``device: auto`` does not.
    """
    from bnpipe.train.plot import plot_curves  # deferred: matplotlib is slow to import

    json_path, png_path = sidecar_paths(config.out)
    save_checkpoint(config.out, net, arch, norm, list(CLASSES), asdict(config), metrics,
                    extra={"resume": state, "run": run})
    write_text_atomic(json_path, json.dumps({"bnpipe_version": __version__, "config": asdict(config), "run": run,
                                             "arch": arch, "preprocessing": norm.to_dict(), "metrics": metrics},
                                            indent=2) + "\n")
    plot_curves(metrics, png_path)
