"""Checkpoints that describe themselves: weights, architecture, preprocessing, config, metrics."""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnpipe import __version__
from bnpipe.atomic import write_bytes_atomic
from bnpipe.errors import BnpipeError, one_line
from bnpipe.train.model import build_model
from bnpipe.train.preprocess import Normalization

FORMAT = "bnpipe.checkpoint/1"
REQUIRED_KEYS = ("format", "arch", "preprocessing", "labels", "config", "metrics", "state_dict")
ARCH_INTS = ("in_channels", "num_classes", "image_size")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: dict[str, Any],
    normalization: Normalization,
    labels: list[str],
    config: dict[str, Any],
    metrics: list[dict[str, float]],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (temporary file, then rename).

    ``extra`` adds fields that later stages ignore, such as ``resume`` (see `bnpipe.train.resume`).
    """
    payload = {
        "format": FORMAT,
        "bnpipe_version": __version__,
        "arch": arch,
        "preprocessing": normalization.to_dict(),
        "labels": labels,
        "config": config,
        "metrics": metrics,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    # Serialized in memory first: torch.save reports a full disk as a RuntimeError, not an OSError.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


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
        # torch's own texts run to paragraphs, and for a foreign file suggest an unsafe reload.
        raise BnpipeError(f"checkpoint {path}: not a readable checkpoint file ({_unreadable(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise BnpipeError(f"checkpoint {path}: not a bnpipe checkpoint (expected format {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise BnpipeError(f"checkpoint {path}: missing fields {missing}")
    problem = _field_problem(ckpt)
    if problem:
        raise BnpipeError(f"checkpoint {path}: {problem}")
    return ckpt


def _field_problem(ckpt: dict[str, Any]) -> str | None:
    """What is wrong with the fields later stages read, or None; the types come from `save_checkpoint`."""
    arch, prep, metrics = ckpt["arch"], ckpt["preprocessing"], ckpt["metrics"]
    if not isinstance(arch, dict) or not all(isinstance(arch.get(k), int) for k in ARCH_INTS):
        return f"field 'arch' must hold the integers {list(ARCH_INTS)}"
    channels = arch["in_channels"]
    if not isinstance(prep, dict) or not isinstance(prep.get("mode"), str) or not all(
        isinstance(prep.get(k), list) and len(prep[k]) == channels
        and all(isinstance(v, float) and math.isfinite(v) for v in prep[k])
        for k in ("mean", "std")
    ) or not all(v > 0 for v in prep["std"]):
        return f"field 'preprocessing' must hold a mode and {channels} finite means and positive stds"
    labels = ckpt["labels"]
    if not isinstance(labels, list) or len(labels) != arch["num_classes"] or not all(
        isinstance(x, str) and x and not set(x) & {"\t", "\n", "\r"} for x in labels  # predict prints TSV
    ):
        return f"field 'labels' must be {arch['num_classes']} non-empty strings without tabs or newlines"
    if not isinstance(metrics, list) or not metrics or not isinstance(metrics[-1], dict) or not isinstance(
        metrics[-1].get("test_acc"), float
    ):
        return "field 'metrics' must list at least one epoch with its test_acc"
    if not isinstance(ckpt["state_dict"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values()):
        return "field 'state_dict' must map names to tensors"
    return None


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
        raise BnpipeError(f"checkpoint {path}: does not fit the bnpipe architecture ({one_line(exc)})") from None
    return model.eval()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unreadable(exc: Exception) -> str:
    """Why torch.load refused a file, in a few words: its own texts run to paragraphs."""
    text = str(exc)
    if "zip archive" in text or (isinstance(exc, OSError) and exc.errno == errno.EINVAL):  # EINVAL: cut short
        return "truncated or corrupt: not a complete zip archive"
    if isinstance(exc, OSError):
        return f"cannot read it ({exc.strerror or one_line(exc)})"
    if "can still be loaded" in text:  # weights_only met a class: a pickled module, not a checkpoint
        return "it holds Python objects, not only tensors and plain containers"
    if isinstance(exc, pickle.UnpicklingError):
        return "not a file torch.save wrote"
    return type(exc).__name__
