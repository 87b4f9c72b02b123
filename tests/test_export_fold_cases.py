"""Export-stage checks that the rest of the suite cannot see: normalization written out by hand, NaN
verification, a `--bn scratch` checkpoint folded, and `bnpipe fold` on this project's own export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from bnpipe.cli import cli
from bnpipe.errors import BnpipeError
from bnpipe.export import pipeline
from bnpipe.export.onnx_export import ort_logits, torch_reference_logits
from bnpipe.export.onnx_fold_file import fold_onnx_file
from bnpipe.train.checkpoint import load_checkpoint, model_from_checkpoint
from bnpipe.train.data import load_mnist
from tests.conftest import real_mnist_root


def _train(tiny_mnist: Path, out: Path, *flags: str) -> Path:
    args = ["train", "--data", str(tiny_mnist), "--epochs", "1", "--out", str(out), *flags]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("mode", ["half", "dataset"])
def test_graph_applies_the_checkpoints_normalization(
    exported_models: dict[str, Path], tiny_mnist: Path, tmp_path: Path, mode: str
) -> None:
    if mode == "half":  # the default the shared fixture was trained with
        ckpt_path, out = exported_models["checkpoint"], exported_models["onnx_folded"]
    else:
        ckpt_path, out = _train(tiny_mnist, tmp_path / "d.pt", "--normalize", "dataset"), tmp_path / "d.onnx"
        pipeline.export_checkpoint(ckpt_path, out, fold_bn=True)
    ckpt = load_checkpoint(ckpt_path)
    prep = ckpt["preprocessing"]
    assert prep["mode"] == mode
    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 1, 28, 28), dtype=np.uint8)
    # (pixels/255 - mean)/std by hand from the stored numbers, not through the graph's own code.
    x = (pixels.astype(np.float64) / 255 - prep["mean"][0]) / prep["std"][0]
    net = model_from_checkpoint(ckpt, ckpt_path).eval()
    with torch.no_grad():
        reference = net(torch.from_numpy(x.astype(np.float32))).numpy()
    assert np.abs(ort_logits(out, pixels) - reference).max() <= 1e-4


def test_nan_logits_fail_verification_and_leave_no_file(
    trained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "ort_logits", lambda path, pixels: np.full((len(pixels), 10), np.nan, np.float32))
    with pytest.raises(BnpipeError, match="verification failed, max \\|logit diff\\| nan"):
        pipeline.export_checkpoint(trained_checkpoint, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_scratch_bn_checkpoint_folds(tiny_mnist: Path, tmp_path: Path) -> None:
    ckpt = _train(tiny_mnist, tmp_path / "s.pt", "--bn", "scratch")
    report = pipeline.export_checkpoint(ckpt, tmp_path / "s.onnx", fold_bn=True, strict=True)
    assert report.before["bn_nodes"] == 2 and report.after["bn_nodes"] == 0 and report.bn_folded
    pixels = np.random.default_rng(1).integers(0, 256, size=(8, 1, 28, 28), dtype=np.uint8)
    assert np.abs(ort_logits(tmp_path / "s.onnx", pixels) - torch_reference_logits(ckpt, pixels)).max() <= 1e-4


def test_fold_of_unfolded_export_equals_export_fold_bn(exported_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "refolded.onnx"
    report = fold_onnx_file(exported_models["onnx_unfolded"], out, strict=True)
    assert report.before["bn_nodes"] == 2 and report.after["bn_nodes"] == 0 and len(report.folded) == 2
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert "bnpipe_folded" in meta and meta["preprocessing"]  # the export's own metadata is kept...
    assert meta["bn_folded"] == "true"  # ...and its fold flag is brought up to date
    images, _ = load_mnist(real_mnist_root(), train=False, download=False)
    pixels = images.numpy()
    assert np.abs(ort_logits(out, pixels) - ort_logits(exported_models["onnx_folded"], pixels)).max() <= 1e-5
    # Both sides above share fold_math: check against the graph that still holds its BN nodes too, with
    # onnxruntime's own Conv+BN fusion off.
    unfolded = ort_logits(exported_models["onnx_unfolded"], pixels, optimize=False)
    assert np.abs(ort_logits(out, pixels) - unfolded).max() <= 1e-4
