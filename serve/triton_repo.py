"""A Triton model repository on disk: ``DIR/<name>/config.pbtxt`` and ``DIR/<name>/1/model.onnx``.

`write_repository` writes one (for ``bnpipe export --triton-repo``); `find_model` finds the model
in one (for ``bnpipe serve --model DIR``). No torch, no onnx, no protobuf.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnpipe.atomic import atomic_path, check_writable, write_text_atomic
from bnpipe.errors import BnpipeError, one_line
from bnpipe.serve.triton_config import (
    BACKEND, CONFIG_FILE, MODEL_FILE, PLATFORM, TRITON_DEVICES, check_model_name, render_pbtxt, tensor_specs,
    triton_config,
)  # fmt: skip

VERSION = 1  # the version folder export writes
_STRING = r'"(?:[^"\\]|\\.)*"'
_COMMENT = re.compile(rf"({_STRING})|#.*")
_FIELD = re.compile(rf"\s*(\w+)\s*:\s*({_STRING}|[\w.+-]+)\s*$")


@dataclass(frozen=True)
class RepoModel:
    """A model found in a Triton repository."""

    name: str
    onnx_path: Path
    config_path: Path
    version: int


def _top_level_fields(text: str) -> dict[str, str]:
    """The scalar fields outside any block of a config.pbtxt, e.g. ``{"name": "bnpipe"}``.

    Enough for the one-field-a-line files that Triton's docs and `render_pbtxt` write; comments
    and strings are taken into account so that braces in them do not count.
    """
    fields, depth = {}, 0
    for line in text.splitlines():
        code = _COMMENT.sub(lambda m: m.group(1) or "", line)  # comments dropped, strings kept
        match = _FIELD.match(code)
        if depth == 0 and match:
            fields[match.group(1)] = match.group(2).strip('"')
        bare = re.sub(_STRING, '""', code)  # braces inside strings do not nest
        depth += bare.count("{") + bare.count("[") - bare.count("}") - bare.count("]")
    return fields


def _model_dir(folder: Path) -> RepoModel:
    """Read one model folder: ``folder/config.pbtxt`` and the newest numeric version's ONNX file."""
    config_path = folder / CONFIG_FILE
    try:
        fields = _top_level_fields(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BnpipeError(f"{config_path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    name = fields.get("name", folder.name)
    if name != folder.name:
        raise BnpipeError(f"{config_path}: name '{name}' differs from its folder '{folder.name}' (Triton refuses that)")
    platform, backend = fields.get("platform", PLATFORM), fields.get("backend", BACKEND)
    if platform != PLATFORM or backend != BACKEND:
        raise BnpipeError(f"{config_path}: platform '{platform}', backend '{backend}': "
                          f"serve runs only '{PLATFORM}' models")
    versions = sorted((int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    if not versions:
        raise BnpipeError(f"{folder}: no version folder (e.g. {folder / '1'})")
    onnx_path = folder / str(versions[0]) / fields.get("default_model_filename", MODEL_FILE)
    if onnx_path.is_dir():  # Triton's rule: a folder named like the file holds model.onnx
        onnx_path = onnx_path / MODEL_FILE
    if not onnx_path.is_file():
        raise BnpipeError(f"{onnx_path}: no such model file (the newest version is {versions[0]})")
    return RepoModel(name, onnx_path, config_path, versions[0])


def find_model(path: str | Path) -> RepoModel:
    """Find the ONNX model in a Triton repository, as ``bnpipe serve --model DIR`` takes it.

    Args:
        path: A repository holding one model (``DIR/<name>/config.pbtxt``, ``DIR/<name>/<version>/``)
            or one model's own folder (``DIR/<name>``).

    Returns:
        The model's name (from its config, which must match its folder), its config file, and the
        ONNX file of its newest version, as Triton's default version policy would load.

    Raises:
        BnpipeError: not a folder, no model or several, an unreadable or non-ONNX config, or no
            model file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise BnpipeError(f"{path}: not a model repository folder" if folder.exists() else f"{path}: no such folder")
    if (folder / CONFIG_FILE).is_file():
        return _model_dir(folder)
    try:
        models = sorted(p for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
    except OSError as exc:
        raise BnpipeError(f"{path}: cannot list ({exc.strerror})") from None
    if len(models) != 1:
        found = ", ".join(p.name for p in models) if models else f"no */{CONFIG_FILE}"
        raise BnpipeError(f"{path}: a repository for serve holds exactly one model, found {found}; "
                          f"pass the model's own folder")
    return _model_dir(models[0])


def write_repository(repo: str | Path, config: dict[str, Any], onnx_file: str | Path) -> Path:
    """Write ``repo/<name>/config.pbtxt`` and copy ``onnx_file`` to ``repo/<name>/1/model.onnx``.

    Each file is written atomically (a reader sees the old file or the whole new one); the
    model goes first, so a config never names a model that is not there yet.

    Args:
        repo: The repository folder (made if missing); other models in it are left alone.
        config: A `triton_config` dict; its ``name`` names the model's folder.
        onnx_file: The verified ONNX file to copy.

    Returns:
        The model's folder, ``repo/<name>``.

    Raises:
        BnpipeError: a file cannot be written.
    """
    folder = Path(repo) / config["name"]
    with atomic_path(folder / str(VERSION) / MODEL_FILE) as tmp:
        shutil.copyfile(onnx_file, tmp)
    write_text_atomic(folder / CONFIG_FILE, render_pbtxt(config))
    return folder


def check_repository_writable(repo: str | Path, name: str, device: str = "gpu") -> None:
    """Fail early, before a long export, when ``repo/<name>`` could not be written later.

    Raises:
        BnpipeError: a bad model name or device, or a folder that cannot be made or written.
    """
    check_model_name(name)
    if device not in TRITON_DEVICES:
        raise BnpipeError(f"triton device {device!r}: expected one of {', '.join(TRITON_DEVICES)}")
    folder = Path(repo) / name
    check_writable(folder / CONFIG_FILE)
    check_writable(folder / str(VERSION) / MODEL_FILE)


def export_repository(repo: str | Path, onnx_file: str | Path, name: str, device: str = "gpu", **options: Any) -> Path:
    """Write the Triton repository for an ONNX file, its inputs and outputs read by onnxruntime.

    Args:
        repo: The repository folder.
        onnx_file: The model to serve.
        name: The model's name in the repository.
        device: ``gpu`` or ``cpu`` instances.
        **options: More `triton_config` keywords (``max_batch_size``, ``max_queue_delay_us``, ``instances``).

    Returns:
        The model's folder, ``repo/<name>``.
    """
    import onnxruntime as ort

    try:  # the CPU provider is enough to read the graph's inputs and outputs
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        raise BnpipeError(f"{onnx_file}: not a usable ONNX model ({one_line(exc)})") from None
    config = triton_config(name, tensor_specs(session.get_inputs()), tensor_specs(session.get_outputs()),
                           device=device, **options)
    return write_repository(repo, config, onnx_file)
