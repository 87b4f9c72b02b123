"""Checkpoints that describe themselves: weights, architecture, preprocessing, config, metrics."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnpipe import __version__
from bnpipe.atomic import atomic_path
from bnpipe.errors import BnpipeError
from bnpipe.train.model import build_model
from bnpipe.train.preprocess import Normalization

FORMAT = "bnpipe.checkpoint/1"
REQUIRED_KEYS = ("format", "arch", "preprocessing", "labels", "config", "metrics", "state_dict")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: dict[str, Any],
    normalization: Normalization,
    labels: list[str],
    config: dict[str, Any],
    metrics: list[dict[str, float]],
) -> None:
    """Write a checkpoint atomically (temporary file, then rename)."""
    payload = {
        "format": FORMAT,
        "bnpipe_version": __version__,
        "arch": arch,
        "preprocessing": normalization.to_dict(),
        "labels": labels,
        "config": config,
        "metrics": metrics,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a bnpipe checkpoint.

    Raises:
        BnpipeError: The file is missing, is not a readable checkpoint, or lacks required fields.
    """
    path = Path(path)
    if not path.is_file():
        raise BnpipeError(f"checkpoint {path}: no such file (run `bnpipe train` first)")
    try:
        # weights_only: a checkpoint is plain dicts, lists and tensors; never unpickle code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BnpipeError(f"checkpoint {path}: not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise BnpipeError(f"checkpoint {path}: not a bnpipe checkpoint (expected format {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise BnpipeError(f"checkpoint {path}: missing fields {missing}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike[str] = "<checkpoint>", bn: str | None = None) -> nn.Module:
    """Rebuild the model from a checkpoint alone, in eval mode.

    Args:
        ckpt: A checkpoint from :func:`load_checkpoint`.
        path: Its file name, for error messages.
        bn: Override the BN kind; "scratch" and "torch" share state_dict keys, so either loads.

    Raises:
        BnpipeError: The checkpoint is of another architecture or its weights do not fit.
    """
    arch = dict(ckpt["arch"], **({"bn": bn} if bn else {}))
    try:
        model = build_model(arch)
        model.load_state_dict(ckpt["state_dict"])
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise BnpipeError(f"checkpoint {path}: does not fit the bnpipe architecture ({reason})") from None
    return model.eval()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
