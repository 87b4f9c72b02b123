"""Serving the real export: `bnpipe predict` equals PyTorch eval of the checkpoint on the same pixels.

Uses the session fixture ``exported_models`` (tests/conftest.py): a quickly trained checkpoint
exported with BN folded and with BN kept. PyTorch is imported here, in the test, only to compute
the reference; serve itself never imports it (test_serve_cli checks that in a subprocess).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bnpipe.cli import cli
from bnpipe.serve.image import load_digit
from bnpipe.serve.predict import softmax
from bnpipe.serve.preprocess import mnist_normalize
from tests.mnist_files import synthetic_digits
from tests.test_serve_support import stroke_digit


@pytest.mark.parametrize("which", ["onnx_folded", "onnx_unfolded"])
def test_predictions_equal_pytorch_eval(exported_models: dict[str, Path], tmp_path: Path, which: str) -> None:
    from bnpipe.export.onnx_export import torch_reference_logits

    images, _ = synthetic_digits(40, seed=11)  # [40, 28, 28] MNIST format: they pass through unchanged
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i:02d}.png")
    result = CliRunner().invoke(cli, ["predict", str(tmp_path), "--json", "--top-k", "10", "--batch-size", "16",
                                      "--model", str(exported_models[which])], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    probs = softmax(torch_reference_logits(exported_models["checkpoint"], images[:, None]))  # [40, 10]
    assert [Path(r["path"]).name for r in rows] == [f"{i:02d}.png" for i in range(40)]
    assert [r["label"] for r in rows] == [str(int(c)) for c in probs.argmax(1)]
    got = np.array([[t["probability"] for t in sorted(r["top_k"], key=lambda t: int(t["label"]))] for r in rows])
    np.testing.assert_allclose(got, probs, atol=1e-5)


def test_big_paper_variants_get_the_original_label(exported_models: dict[str, Path], tmp_path: Path) -> None:
    """A digit drawn black on white at 4x, as RGB, RGBA and 16-bit, is labelled like the 28x28 original."""
    from bnpipe.export.onnx_export import torch_reference_logits

    digit = mnist_normalize(stroke_digit(200, seed=7))  # [28, 28] canonical
    paper = 255 - np.kron(digit, np.ones((4, 4), np.uint8))  # [112, 112] dark ink on white
    rgba = np.zeros((112, 112, 4), np.uint8)
    rgba[..., 3] = 255 - paper  # black strokes on a transparent canvas
    variants = {"orig.png": Image.fromarray(digit), "rgb.png": Image.fromarray(np.stack([paper] * 3, -1)),
                "rgba.png": Image.fromarray(rgba, "RGBA"), "wide.png": Image.fromarray(paper.astype(np.uint16) * 257)}
    for name, im in variants.items():
        im.save(tmp_path / name)
    pixels = np.stack([load_digit(str(tmp_path / n), n) for n in variants])  # [4, 28, 28]
    assert np.array_equal(pixels[0], digit)
    probs = softmax(torch_reference_logits(exported_models["checkpoint"], pixels[:, None]))
    result = CliRunner().invoke(cli, ["predict", *[str(tmp_path / n) for n in variants],
                                      "--model", str(exported_models["onnx_folded"])], catch_exceptions=False)
    labels = [line.split("\t")[1] for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and labels == [str(int(probs[0].argmax()))] * 4
    np.testing.assert_allclose(probs[1:], np.repeat(probs[:1], 3, axis=0), atol=0.05)
