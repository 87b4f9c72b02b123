"""`bnpipe export` as a library call: load, fold, export, write atomically, verify, report."""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from bnpipe.atomic import atomic_path, check_writable
from bnpipe.datadir import mnist_test_images
from bnpipe.errors import BnpipeError, one_line
from bnpipe.export.fold import fold_batchnorms
from bnpipe.export.onnx_export import (
    DEFAULT_OPSET, PixelsToLogits, build_metadata, compare_logits, load_net, ort_logits,
    to_onnx, torch_reference_logits, verification_pixels, weight_count,
)  # fmt: skip
from bnpipe.export.onnx_verify import graph_stats, set_metadata
from bnpipe.serve.triton_repo import check_repository_writable, export_repository
from bnpipe.train.preprocess import Normalization

DEFAULT_TOLERANCE = 1e-4


@dataclass
class ExportReport:
    """What an export did and how the written model compared with PyTorch."""

    out: Path
    bn_folded: bool
    before: dict[str, int]
    after: dict[str, int]
    size_bytes: int
    max_abs_diff: float
    argmax_agreement: float
    verified_on: str
    seconds: float
    folded: list[tuple[str, str]] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)  # BN name -> why it was not folded
    triton_model: Path | None = None  # DIR/<name> of the Triton repository written, if any

    def lines(self) -> list[str]:
        """The human-readable report, one fact per line."""
        b, a = self.before, self.after
        out = [
            f"wrote {self.out} ({self.size_bytes / 1024:.1f} KiB), BN folded: {'yes' if self.bn_folded else 'no'}",
            f"nodes {b['nodes']} -> {a['nodes']}, BatchNormalization nodes {b['bn_nodes']} -> {a['bn_nodes']}, "
            f"weights (parameters and BN statistics) {b['params']} -> {a['params']}",
        ]
        out += [f"folded {bn} into {layer}" for layer, bn in self.folded]
        out += [f"left in place: {bn} ({why})" for bn, why in self.left.items()]
        out += [
            f"verified on {self.verified_on}: max |logit diff| {self.max_abs_diff:.3g}, "
            f"argmax agreement {self.argmax_agreement:.2%}",
        ]
        if self.triton_model is not None:
            repo = shlex.quote(str(self.triton_model.parent))
            out.append(f"wrote Triton model repository {self.triton_model} (config.pbtxt, 1/model.onnx); "
                       f"serve it: tritonserver --model-repository {repo}, or bnpipe serve --model {repo}")
        out += [
            f"done in {self.seconds:.1f}s; try: bnpipe predict --model {shlex.quote(str(self.out))} IMAGE...",
        ]
        return out


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fold_bn: bool = False,
    strict: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = DEFAULT_OPSET,
    data_root: Path | None = None,
    triton_repo: str | os.PathLike[str] | None = None,
    triton_device: str = "gpu",
    triton_name: str = "bnpipe",
    require_data: bool = False,
) -> ExportReport:
    """Export a checkpoint to ONNX, optionally folding BN first, and verify the written file.

    The file is written to a temporary path, run in onnxruntime against PyTorch eval of the
    unfolded checkpoint, and renamed into place only if the max logit difference is within
    ``tolerance``. Otherwise nothing is left behind.

    Args:
        checkpoint: A checkpoint from `bnpipe train`.
        out: The ONNX path to write.
        fold_bn: Fold each BatchNorm into the layer before it (float64 arithmetic).
        strict: With ``fold_bn``, a BatchNorm that cannot be folded is an error.
        tolerance: Largest allowed max |logit difference| against PyTorch.
        opset: ONNX opset version.
        data_root: MNIST root whose test images verify the export; random pixels if absent.
        triton_repo: Also write a Triton model repository here: ``<name>/config.pbtxt`` and a
            copy of the verified model as ``<name>/1/model.onnx``.
        triton_device: The repository's instance kind, ``gpu`` or ``cpu``.
        triton_name: The model's name in the repository.
        require_data: ``data_root`` was named by the user: it must hold the MNIST test images (random
            pixels would hide a typo).

    Raises:
        BnpipeError: Bad checkpoint, refused folding, or a verification failure.
    """
    t0 = time.perf_counter()
    if require_data and data_root is not None and not mnist_test_images(data_root).is_file():
        raise BnpipeError(f"--data {data_root}: no MNIST test images ({mnist_test_images(data_root)} is missing)")
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise BnpipeError(f"--out {out}: would overwrite the checkpoint it exports")
    check_writable(out)  # before the exports, not after
    if triton_repo is not None:
        check_repository_writable(triton_repo, triton_name, triton_device)
    ckpt, net = load_net(checkpoint)
    norm = Normalization.from_dict(ckpt["preprocessing"])
    size = int(ckpt["arch"]["image_size"])
    example = torch.zeros(2, int(ckpt["arch"]["in_channels"]), size, size, dtype=torch.uint8)
    unfolded = to_onnx(PixelsToLogits(net, norm), example, opset)
    before = {**graph_stats(unfolded), "params": weight_count(net)}
    model, after, folded, left = unfolded, before, [], {}
    if fold_bn:
        result = fold_batchnorms(net, strict=strict, example_inputs=(norm.apply(example),))
        folded, left = result.folded, {bn: result.reasons[bn] for bn in result.left}
        model = to_onnx(PixelsToLogits(result.module, norm), example, opset)
        after = {**graph_stats(model), "params": weight_count(result.module)}
    bn_folded = bool(folded) and not left
    set_metadata(model, build_metadata(ckpt, checkpoint, bn_folded=bn_folded))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BnpipeError(f"exported model fails onnx.checker: {one_line(exc)}") from None

    pixels, source = verification_pixels(data_root)
    reference = torch_reference_logits(checkpoint, pixels)
    with atomic_path(out) as tmp:
        onnx.save(model, tmp)
        diff, agree = compare_logits(reference, ort_logits(tmp, pixels))
        if not diff <= tolerance:  # also catches NaN
            raise BnpipeError(f"{out}: verification failed, max |logit diff| {diff:.3g} exceeds tolerance "
                              f"{tolerance:g} (argmax agreement {agree:.2%}); no file written")
        size_bytes = tmp.stat().st_size
    triton_model = None if triton_repo is None else export_repository(triton_repo, out, triton_name, triton_device)
    return ExportReport(Path(out), bn_folded, before, after, size_bytes, diff, agree, source,
                        time.perf_counter() - t0, folded, left, triton_model)
