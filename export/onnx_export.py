"""Checkpoint to ONNX: raw uint8 pixels in, logits out, normalization and metadata inside the file."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from bnpipe import __version__
from bnpipe.contract import INPUT_NAME, OUTPUT_NAME, input_layout
from bnpipe.errors import BnpipeError, one_line
from bnpipe.export.onnx_verify import run_cpu
from bnpipe.train.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint
from bnpipe.train.preprocess import Normalization

DEFAULT_OPSET = 18


class PixelsToLogits(nn.Module):
    """The net behind the checkpoint's own normalization: uint8 [N, 1, 28, 28] -> logits [N, 10]."""

    def __init__(self, net: nn.Module, norm: Normalization) -> None:
        super().__init__()
        self.net, self.norm = net, norm

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw pixels uint8 [N, C, H, W] -> logits [N, classes]."""
        return self.net(self.norm.apply(pixels))


def load_net(checkpoint: str | os.PathLike[str]) -> tuple[dict[str, Any], nn.Module]:
    """Load a checkpoint and rebuild its net in eval mode, with ``nn.BatchNorm2d`` layers.

    A ``--bn scratch`` checkpoint has the same state_dict keys as ``nn.BatchNorm2d``, so it loads
    into the torch layers that both the folding and the ONNX exporter understand.
    """
    ckpt = load_checkpoint(checkpoint)
    bn = "torch" if ckpt["arch"].get("bn") == "scratch" else None
    return ckpt, model_from_checkpoint(ckpt, checkpoint, bn=bn)


def to_onnx(module: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export with the dynamo exporter, a dynamic batch axis, and constant folding only.

    The exporter's ``optimize=True`` would fuse Conv and BatchNormalization itself; we fold only
    constants, so the BN nodes are gone exactly when our own folding removed them.
    """
    import onnx_ir
    import onnxscript.optimizer

    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")  # the exporter warns about internals the user cannot act on
        try:
            program = torch.onnx.export(
                module.eval(), (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, optimize=False,
                verbose=False, report=False,
            )
        except Exception as exc:  # noqa: BLE001 - torch.export and onnxscript raise many types
            raise BnpipeError(f"the ONNX exporter failed: {one_line(exc, 200)}") from None
    model = program.model
    onnxscript.optimizer.fold_constants(model)
    onnxscript.optimizer.remove_unused_nodes(model)
    proto = onnx_ir.serde.serialize_model(model)
    written = {o.domain: o.version for o in proto.opset_import}.get("", None)
    if written != opset:
        raise BnpipeError(f"--opset {opset}: the exporter wrote opset {written} instead")
    return proto


def weight_count(module: nn.Module) -> int:
    """Numbers the model stores: parameters and BN running statistics (not the batch counter)."""
    return sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())


def build_metadata(ckpt: dict[str, Any], checkpoint: str | os.PathLike[str], bn_folded: bool) -> dict[str, str]:
    """The ``metadata_props`` that make the ONNX file describe itself."""
    metrics = ckpt["metrics"]
    return {
        "bnpipe_version": __version__,
        "preprocessing": json.dumps(ckpt["preprocessing"]),
        "labels": json.dumps(list(ckpt["labels"])),
        "input_layout": json.dumps(input_layout(int(ckpt["arch"]["in_channels"]), int(ckpt["arch"]["image_size"]))),
        "bn_folded": "true" if bn_folded else "false",
        "source_checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint_test_acc": f"{metrics[-1]['test_acc']:.6f}",
        "architecture": json.dumps(ckpt["arch"]),
    }


def torch_reference_logits(checkpoint: str | os.PathLike[str], pixels: np.ndarray) -> np.ndarray:
    """PyTorch eval of the unfolded checkpoint on raw pixels uint8 [N, 1, 28, 28]: logits [N, 10]."""
    ckpt, net = load_net(checkpoint)
    wrapped = PixelsToLogits(net, Normalization.from_dict(ckpt["preprocessing"])).eval()
    with torch.inference_mode():
        return wrapped(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()


def ort_logits(model_path: str | os.PathLike[str], pixels: np.ndarray, optimize: bool = True) -> np.ndarray:
    """Run an ONNX file on onnxruntime's CPU provider: pixels uint8 [N, 1, 28, 28] -> logits [N, 10]."""
    return run_cpu(model_path, {INPUT_NAME: pixels}, optimize=optimize)[0]  # the contract's one output


def verification_pixels(data_root: Path | None, n: int = 1000, seed: int = 0) -> tuple[np.ndarray, str]:
    """Pixels to verify an export on: real MNIST test images when found, random uint8 otherwise."""
    from bnpipe.datadir import mnist_test_images
    from bnpipe.train.data import load_mnist

    if data_root is not None and mnist_test_images(data_root).is_file():
        images, _ = load_mnist(data_root, train=False, download=False)
        return images[:n].numpy(), f"{min(n, len(images))} MNIST test images from {data_root}"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8), f"{n} random uint8 images (no MNIST found)"


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Max absolute logit difference and argmax agreement (fraction) of two [N, 10] arrays."""
    if reference.shape != candidate.shape:
        raise BnpipeError(f"ONNX logits have shape {candidate.shape}, PyTorch's {reference.shape}")
    diff = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64))))
    agree = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    return diff, agree
